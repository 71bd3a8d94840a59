package kubenode

import (
	"context"
	"log/slog"
	"net/http"
	"strings"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	authzv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// authorize lets through the kubelet API only requests the API server
// allows, as a kubelet in webhook mode does: the caller is the subject of
// a client certificate the client CA signed, or of a bearer token the API
// server vouches for (TokenReview); what it may do on this node is then
// asked of the API server (SubjectAccessReview).
//
// Written here rather than taken from k8s.io/apiserver's delegating
// authenticator, which would more than double the smolvm binary for two
// API calls.
func authorize(client kubernetes.Interface, nodeName string, log *slog.Logger, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
		defer cancel()
		user, groups, ok := authenticate(ctx, client, r)
		if !ok {
			http.Error(w, "Unauthorized", http.StatusUnauthorized)
			return
		}
		review := &authzv1.SubjectAccessReview{Spec: authzv1.SubjectAccessReviewSpec{
			User:   user,
			Groups: groups,
			ResourceAttributes: &authzv1.ResourceAttributes{
				Verb:        verb(r.Method),
				Version:     "v1",
				Resource:    "nodes",
				Subresource: subresource(r.URL.Path),
				Name:        nodeName,
			},
		}}
		res, err := client.AuthorizationV1().SubjectAccessReviews().Create(ctx, review, metav1.CreateOptions{})
		if err != nil {
			log.Warn("kubelet API: asking the API server whether a request is allowed", "user", user, "path", r.URL.Path, "err", err)
			http.Error(w, "authorization failed", http.StatusInternalServerError)
			return
		}
		if !res.Status.Allowed {
			http.Error(w, "Forbidden (user="+user+", verb="+review.Spec.ResourceAttributes.Verb+", resource=nodes, subresource="+review.Spec.ResourceAttributes.Subresource+")", http.StatusForbidden)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// authenticate is who made r.
func authenticate(ctx context.Context, client kubernetes.Interface, r *http.Request) (string, []string, bool) {
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 {
		cert := r.TLS.VerifiedChains[0][0]
		return cert.Subject.CommonName, cert.Subject.Organization, cert.Subject.CommonName != ""
	}
	token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || token == "" {
		return "", nil, false
	}
	res, err := client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{Spec: authnv1.TokenReviewSpec{Token: token}}, metav1.CreateOptions{})
	if err != nil || !res.Status.Authenticated {
		return "", nil, false
	}
	return res.Status.User.Username, res.Status.User.Groups, true
}

func verb(method string) string {
	switch method {
	case http.MethodPost:
		return "create"
	case http.MethodGet, http.MethodHead:
		return "get"
	case http.MethodPut:
		return "update"
	case http.MethodPatch:
		return "patch"
	case http.MethodDelete:
		return "delete"
	}
	return strings.ToLower(method)
}

// subresource is the node subresource a kubelet path is, as the kubelet
// names them.
func subresource(path string) string {
	under := func(prefix string) bool {
		return path == prefix || strings.HasPrefix(path, prefix+"/")
	}
	switch {
	case under("/stats"):
		return "stats"
	case under("/metrics"):
		return "metrics"
	case under("/logs"):
		return "log"
	case under("/spec"):
		return "spec"
	}
	return "proxy"
}
