package gateway

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"

	"github.com/smolvm/smolvm/internal/api"
	"github.com/smolvm/smolvm/internal/kubenode"
	"github.com/smolvm/smolvm/internal/sandbox"
)

// found is one sandbox as the cluster holds it.
type found struct {
	id    string
	obj   *unstructured.Unstructured // the Sandbox or claim named id
	claim bool
	// sandbox is the Sandbox running it: obj itself, or the one a claim
	// got (nil until it has one).
	sandbox *unstructured.Unstructured
	pod     *corev1.Pod // nil until there is one
	req     api.CreateSandboxRequest
}

// status is the sandbox's status as its pod tells.
func (f *found) status() string {
	p := f.pod
	switch {
	case p == nil || p.Status.Phase == corev1.PodPending || p.Status.Phase == "":
		return "creating"
	case p.Status.Phase == corev1.PodRunning:
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return "running"
			}
		}
		// A paused VM's pod runs without being ready.
		return "paused"
	case p.Status.Phase == corev1.PodSucceeded:
		return "stopped"
	}
	return "error"
}

// errorText is why the sandbox failed, or why it waits.
func (f *found) errorText() string {
	p := f.pod
	if p == nil {
		return ""
	}
	if p.Status.Message != "" && (p.Status.Phase == corev1.PodFailed || p.Status.Phase == corev1.PodSucceeded) {
		return p.Status.Message
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse && c.Message != "" {
			return "not placed yet: " + c.Message
		}
	}
	return ""
}

// view is the API's Sandbox from the objects alone.
func (f *found) view() api.Sandbox {
	r := f.req
	s := api.Sandbox{
		ID:        f.id,
		Status:    f.status(),
		OS:        r.OS,
		Image:     r.Image,
		Memory:    cmp.Or(r.Memory, 512),
		DiskSize:  cmp.Or(r.DiskSize, 1024),
		VCPUs:     cmp.Or(r.VCPUs, 1),
		CreatedAt: f.obj.GetCreationTimestamp().UTC(),
		Ports:     []api.Port{},
		Name:      r.Name,
		Labels:    r.Labels,
		Env:       r.Env,
		Timeout:   r.Timeout,
		OnTimeout: r.OnTimeout,
	}
	if s.OS == "" && s.Image == "" {
		s.OS = "debian" // the default sandbox, as the pod asks for it
	}
	if s.Status == "error" || s.Status == "creating" {
		s.Error = f.errorText()
	}
	s.Network.Mode = "open"
	if r.Network != nil {
		if r.Network.Mode != "" {
			s.Network.Mode = r.Network.Mode
		}
		s.Network.Allow = append(slices.Clone(r.Network.Allow), r.Network.AllowedCIDRs...)
		if len(r.Network.AllowedCIDRs) > 0 && s.Network.Mode != "off" {
			s.Network.Mode = "restricted"
		}
	}
	if r.Timeout > 0 {
		exp := f.obj.GetCreationTimestamp().Add(time.Duration(r.Timeout) * time.Second).UTC()
		s.ExpiresAt = &exp
	}
	return s
}

// detail is the sandbox as its node tells, with the gateway's id, name
// and labels; the objects' view when the node cannot say.
func (g *Gateway) detail(ctx context.Context, f *found) api.Sandbox {
	v := f.view()
	if v.Status != "running" && v.Status != "paused" {
		return v
	}
	t, err := g.targetOf(ctx, f.pod)
	if err != nil {
		return v
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, t.base.String()+t.path, nil)
	if err != nil {
		return v
	}
	res, err := (&http.Client{Transport: g.nodes}).Do(req)
	if err != nil {
		g.log.Warn("reading a sandbox from its node", "sandbox", f.id, "node", t.node, "err", err)
		return v
	}
	defer res.Body.Close()
	var s api.Sandbox
	if res.StatusCode != http.StatusOK || json.NewDecoder(res.Body).Decode(&s) != nil {
		g.log.Warn("reading a sandbox from its node", "sandbox", f.id, "node", t.node, "status", res.Status)
		return v
	}
	s.ID, s.Name, s.Labels = v.ID, v.Name, v.Labels
	s.Timeout, s.OnTimeout, s.ExpiresAt = v.Timeout, v.OnTimeout, v.ExpiresAt
	s.CreatedAt = v.CreatedAt
	return s
}

// find reads sandbox id (or the sandbox of that name); it has answered
// the request when ok is false.
func (g *Gateway) find(w http.ResponseWriter, r *http.Request, id string) (*found, bool) {
	f, err := g.lookup(r.Context(), id)
	if err != nil {
		g.writeError(w, r, err)
		return nil, false
	}
	if f == nil {
		api.WriteProblem(w, r, http.StatusNotFound, api.CodeSandboxNotFound, "no sandbox with id or name "+strconv.Quote(id))
		return nil, false
	}
	return f, true
}

// lookup is sandbox id, or nil if there is none.
func (g *Gateway) lookup(ctx context.Context, id string) (*found, error) {
	for _, claim := range []bool{false, true} {
		obj, err := g.objects(claim).Get(ctx, id, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("reading sandbox %s: %w", id, err)
		}
		if obj.GetLabels()[LabelManagedBy] != managedBy {
			continue
		}
		return g.complete(ctx, obj, claim, nil)
	}
	if strings.HasPrefix(id, "vm-") || sandbox.CheckName("name", id) != nil {
		return nil, nil
	}
	// A name: the label of the object that has it, the first made if a
	// race left two.
	named, err := g.named(ctx, id)
	if err != nil || len(named) == 0 {
		return nil, err
	}
	return g.complete(ctx, named[0].obj, named[0].claim, nil)
}

// listed is a namespace's Sandboxes and pods, read once for a list.
type listed struct {
	sandboxes map[string]*unstructured.Unstructured
	pods      map[string]*corev1.Pod
}

// complete reads what obj leads to: the claim's Sandbox, and the pod;
// from ns when given, else from the API.
func (g *Gateway) complete(ctx context.Context, obj *unstructured.Unstructured, claim bool, ns *listed) (*found, error) {
	f := &found{id: obj.GetName(), obj: obj, claim: claim}
	if s := obj.GetAnnotations()[annotationRequest]; s != "" {
		if err := json.Unmarshal([]byte(s), &f.req); err != nil {
			return nil, fmt.Errorf("%s %s: its %s annotation: %w", obj.GetKind(), obj.GetName(), annotationRequest, err)
		}
	}
	f.sandbox = obj
	if claim {
		name, _, _ := unstructured.NestedString(obj.Object, "status", "sandbox", "name")
		if name == "" {
			f.sandbox = nil
			return f, nil
		}
		sb, err := g.sandboxNamed(ctx, ns, name)
		if err != nil || sb == nil {
			f.sandbox = nil
			return f, err
		}
		f.sandbox = sb
	}
	pod, err := g.podNamed(ctx, ns, podName(f.sandbox))
	f.pod = pod
	return f, err
}

// sandboxNamed is the Sandbox name, from ns when given; nil if there is
// none.
func (g *Gateway) sandboxNamed(ctx context.Context, ns *listed, name string) (*unstructured.Unstructured, error) {
	if ns != nil {
		return ns.sandboxes[name], nil
	}
	sb, err := g.objects(false).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading Sandbox %s: %w", name, err)
	}
	return sb, nil
}

// podNamed is the pod name, from ns when given; nil if there is none.
func (g *Gateway) podNamed(ctx context.Context, ns *listed, name string) (*corev1.Pod, error) {
	if ns != nil {
		return ns.pods[name], nil
	}
	pod, err := g.core.CoreV1().Pods(g.ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading pod %s: %w", name, err)
	}
	return pod, nil
}

// object is one of the gateway's Sandboxes or claims.
type object struct {
	obj   *unstructured.Unstructured
	claim bool
}

// managed is the gateway's Sandboxes, then its claims, with the labels
// in sel besides its own.
func (g *Gateway) managed(ctx context.Context, sel labels.Set) ([]object, error) {
	sel = labels.Merge(sel, labels.Set{LabelManagedBy: managedBy})
	var out []object
	for _, claim := range []bool{false, true} {
		list, err := g.objects(claim).List(ctx, metav1.ListOptions{LabelSelector: sel.String()})
		if claim && apierrors.IsNotFound(err) {
			break // agent-sandbox's extensions are not installed
		}
		if err != nil {
			return nil, fmt.Errorf("listing sandboxes: %w", err)
		}
		for i := range list.Items {
			out = append(out, object{&list.Items[i], claim})
		}
	}
	return out, nil
}

// named is the sandboxes named name, the first made first (ties go by
// id): two gateways may both have found the name free.
func (g *Gateway) named(ctx context.Context, name string) ([]object, error) {
	all, err := g.managed(ctx, labels.Set{LabelName: name})
	slices.SortFunc(all, func(a, b object) int {
		if c := a.obj.GetCreationTimestamp().Compare(b.obj.GetCreationTimestamp().Time); c != 0 {
			return c
		}
		return strings.Compare(a.obj.GetName(), b.obj.GetName())
	})
	return all, err
}

// objects are the gateway's Sandboxes, or its claims.
func (g *Gateway) objects(claim bool) dynamic.ResourceInterface {
	if claim {
		return g.dyn.Resource(claimsGVR).Namespace(g.ns)
	}
	return g.dyn.Resource(sandboxesGVR).Namespace(g.ns)
}

// podName is the pod a Sandbox runs as.
func podName(sb *unstructured.Unstructured) string {
	if n := sb.GetAnnotations()[annotationPodName]; n != "" {
		return n
	}
	return sb.GetName()
}

func (g *Gateway) get(w http.ResponseWriter, r *http.Request) {
	f, ok := g.find(w, r, r.PathValue("id"))
	if !ok {
		return
	}
	writeJSON(w, http.StatusOK, g.detail(r.Context(), f))
}

func (g *Gateway) list(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	want := map[string]string{}
	for _, l := range r.URL.Query()["label"] {
		k, v, err := sandbox.ParseLabelFilter(l)
		if err != nil {
			api.WriteProblem(w, r, http.StatusUnprocessableEntity, api.CodeValidationFailed, err.Error())
			return
		}
		want[k] = v
	}
	// A few lists, whatever the number of sandboxes: every Sandbox (a
	// claim's was made by its pool, not by the gateway), every pod, and
	// the gateway's own Sandboxes and claims.
	ns := &listed{sandboxes: map[string]*unstructured.Unstructured{}, pods: map[string]*corev1.Pod{}}
	sbs, err := g.objects(false).List(ctx, metav1.ListOptions{})
	if err != nil {
		g.writeError(w, r, fmt.Errorf("listing sandboxes: %w", err))
		return
	}
	for i := range sbs.Items {
		ns.sandboxes[sbs.Items[i].GetName()] = &sbs.Items[i]
	}
	pods, err := g.core.CoreV1().Pods(g.ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		g.writeError(w, r, fmt.Errorf("listing pods: %w", err))
		return
	}
	for i := range pods.Items {
		ns.pods[pods.Items[i].Name] = &pods.Items[i]
	}
	objs, err := g.managed(ctx, nil)
	if err != nil {
		g.writeError(w, r, err)
		return
	}
	var all []*found
	for _, o := range objs {
		f, err := g.complete(ctx, o.obj, o.claim, ns)
		if err != nil {
			g.writeError(w, r, err)
			return
		}
		match := true
		for k, v := range want {
			if f.req.Labels[k] != v {
				match = false
			}
		}
		if match {
			all = append(all, f)
		}
	}
	slices.SortFunc(all, func(a, b *found) int {
		return a.obj.GetCreationTimestamp().Compare(b.obj.GetCreationTimestamp().Time)
	})
	out := api.SandboxList{Sandboxes: make([]api.Sandbox, len(all))}
	var wg sync.WaitGroup
	limit := make(chan struct{}, 8)
	for i, f := range all {
		wg.Go(func() {
			limit <- struct{}{}
			defer func() { <-limit }()
			out.Sandboxes[i] = g.detail(ctx, f)
		})
	}
	wg.Wait()
	writeJSON(w, http.StatusOK, out)
}

func (g *Gateway) create(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	body, err := g.decoder.Decode(r)
	if err != nil {
		g.writeError(w, r, err)
		return
	}
	if p := unsupported(body); p != nil {
		api.WriteProblem(w, r, http.StatusUnprocessableEntity, CodeNotInCluster, p.Error())
		return
	}
	tmpl, err := podTemplate(body, g.class)
	if err != nil {
		g.writeError(w, r, err)
		return
	}
	if body.Name != "" {
		if taken, err := g.named(ctx, body.Name); err != nil {
			g.writeError(w, r, err)
			return
		} else if len(taken) > 0 {
			api.WriteProblem(w, r, http.StatusConflict, api.CodeConflict, fmt.Sprintf("the name %q is taken by sandbox %s", body.Name, taken[0].obj.GetName()))
			return
		}
	}
	reqJSON, err := json.Marshal(body)
	if err != nil {
		g.writeError(w, r, err)
		return
	}
	id := newID()
	meta := map[string]any{
		"name":        id,
		"namespace":   g.ns,
		"labels":      map[string]any{LabelManagedBy: managedBy},
		"annotations": map[string]any{annotationRequest: string(reqJSON)},
	}
	if body.Name != "" {
		meta["labels"].(map[string]any)[LabelName] = body.Name
	}
	pool, err := g.warmPool(ctx, body, tmpl)
	if err != nil {
		g.writeError(w, r, err)
		return
	}
	var obj *unstructured.Unstructured
	if pool != "" {
		spec := map[string]any{"warmPoolRef": map[string]any{"name": pool}}
		if body.Timeout > 0 {
			spec["lifecycle"] = map[string]any{"shutdownTime": shutdownTime(body.Timeout), "shutdownPolicy": "Delete"}
		}
		obj = &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": claimsGVR.GroupVersion().String(), "kind": "SandboxClaim", "metadata": meta, "spec": spec,
		}}
		obj, err = g.dyn.Resource(claimsGVR).Namespace(g.ns).Create(ctx, obj, metav1.CreateOptions{})
	} else {
		pt, cerr := runtime.DefaultUnstructuredConverter.ToUnstructured(tmpl)
		if cerr != nil {
			g.writeError(w, r, cerr)
			return
		}
		spec := map[string]any{"podTemplate": pt}
		if body.Timeout > 0 {
			spec["shutdownTime"], spec["shutdownPolicy"] = shutdownTime(body.Timeout), "Delete"
		}
		obj = &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": sandboxesGVR.GroupVersion().String(), "kind": "Sandbox", "metadata": meta, "spec": spec,
		}}
		obj, err = g.dyn.Resource(sandboxesGVR).Namespace(g.ns).Create(ctx, obj, metav1.CreateOptions{})
	}
	if err != nil {
		g.writeError(w, r, fmt.Errorf("creating the sandbox's object: %w", err))
		return
	}
	if body.Name != "" {
		// Two gateways may both have found the name free: the first
		// made keeps it.
		if taken, err := g.named(ctx, body.Name); err != nil || len(taken) == 0 || taken[0].obj.GetName() != id {
			g.remove(context.WithoutCancel(ctx), id, pool != "")
			if err != nil {
				g.writeError(w, r, err)
				return
			}
			other := "another sandbox"
			if len(taken) > 0 {
				other = "sandbox " + taken[0].obj.GetName()
			}
			api.WriteProblem(w, r, http.StatusConflict, api.CodeConflict, fmt.Sprintf("the name %q is taken by %s", body.Name, other))
			return
		}
	}
	g.log.Info("sandbox created", "sandbox", id, "kind", obj.GetKind(), "warm_pool", pool)
	w.Header().Set("Location", "/sandboxes/"+id)
	if preferAsync(r.Header.Get("Prefer")) {
		f := &found{id: id, obj: obj, claim: pool != "", req: body}
		writeJSON(w, http.StatusAccepted, f.view())
		return
	}
	f, err := g.waitRunning(ctx, id)
	if err != nil {
		// Nobody holds the id of a create that failed: it goes.
		g.remove(context.WithoutCancel(ctx), id, pool != "")
		g.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, g.detail(ctx, f))
}

// waitRunning waits for sandbox id's VM to run.
func (g *Gateway) waitRunning(ctx context.Context, id string) (*found, error) {
	ctx, cancel := context.WithTimeout(ctx, g.timeout)
	defer cancel()
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	var last *found
	for {
		f, err := g.lookup(ctx, id)
		switch {
		case err != nil && ctx.Err() == nil:
			return nil, err
		case f == nil && err == nil:
			return nil, &problem{http.StatusConflict, api.CodeConflict, "sandbox " + id + " was deleted while it was being created"}
		case f != nil:
			last = f
			switch f.status() {
			case "running":
				return f, nil
			case "error", "stopped":
				msg := f.errorText()
				if f.pod != nil && f.pod.Status.Reason == "InvalidSmolvmPod" {
					return nil, &problem{http.StatusUnprocessableEntity, api.CodeValidationFailed, msg}
				}
				return nil, &problem{http.StatusInternalServerError, api.CodeInternal, "the sandbox's VM failed on its node: " + msg}
			}
		}
		select {
		case <-ctx.Done():
			why := "no VM runs it yet"
			if last != nil && last.errorText() != "" {
				why = last.errorText()
			}
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return nil, &problem{http.StatusGatewayTimeout, CodeCreateTimeout, fmt.Sprintf("sandbox %s did not run within %s (%s); it is deleted", id, g.timeout, why)}
			}
			return nil, ctx.Err()
		case <-tick.C:
		}
	}
}

func (g *Gateway) delete(w http.ResponseWriter, r *http.Request) {
	f, ok := g.find(w, r, r.PathValue("id"))
	if !ok {
		return
	}
	gone, err := g.remove(r.Context(), f.id, f.claim)
	if err != nil {
		g.writeError(w, r, err)
		return
	}
	if !gone {
		// Its node has not confirmed yet (a node that is down never
		// does until it is fenced): the cluster goes on deleting it.
		w.WriteHeader(http.StatusAccepted)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// remove deletes sandbox id's object and waits up to a minute for it to
// be gone: in the foreground, so the object goes only once its pod has,
// and the pod once its node has deleted the VM.
func (g *Gateway) remove(ctx context.Context, id string, claim bool) (bool, error) {
	res := g.objects(claim)
	fg := metav1.DeletePropagationForeground
	if err := res.Delete(ctx, id, metav1.DeleteOptions{PropagationPolicy: &fg}); err != nil && !apierrors.IsNotFound(err) {
		return false, fmt.Errorf("deleting sandbox %s: %w", id, err)
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		_, err := res.Get(ctx, id, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, nil
		}
		select {
		case <-ctx.Done():
			return false, nil
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// unsupported is what a cluster cannot do of body.
func unsupported(b api.CreateSandboxRequest) error {
	switch {
	case b.Backend != "" && b.Backend != "auto":
		return errors.New("backend: each node picks its own backend; omit it or use auto")
	case b.Snapshot != "":
		return errors.New("snapshot: snapshots stay on the host that took them")
	case len(b.Mounts) > 0:
		return errors.New("mounts: a node's directories are not the caller's")
	case b.OS == "windows":
		return errors.New("os: windows guests do not run on smolvm nodes")
	case b.OnTimeout == "pause":
		return errors.New("on_timeout: a cluster deletes sandboxes at their deadline, it does not pause them")
	case b.Network != nil && (b.Network.AllowHostLoopback || b.Network.AllowPrivate):
		return errors.New("network: allow_host_loopback and allow_private are not offered on a shared node")
	}
	return nil
}

// podTemplate is the pod body asks for, as a smolvm node reads it.
func podTemplate(b api.CreateSandboxRequest, class string) (*corev1.PodTemplateSpec, error) {
	if b.Name != "" {
		if err := sandbox.CheckName("name", b.Name); err != nil {
			return nil, err
		}
		if strings.HasPrefix(b.Name, "vm-") {
			return nil, &sandbox.Error{Kind: sandbox.KindInvalid, Code: "invalid_name", Field: "name", Message: fmt.Sprintf("name %q may not start with \"vm-\", which sandbox ids use", b.Name)}
		}
	}
	if err := sandbox.CheckLabels(b.Labels); err != nil {
		return nil, err
	}
	if err := sandbox.CheckEnv(b.Env); err != nil {
		return nil, err
	}
	req, err := api.CreateRequest(b)
	if err != nil {
		return nil, err
	}
	ann := map[string]string{}
	image := b.Image
	if b.OS != "" && b.Image == "" {
		ann[kubenode.AnnotationOS] = b.OS
		image = b.OS // a pod needs an image; the node boots the preset
	}
	if image == "" {
		// The default sandbox, as a single server makes it.
		ann[kubenode.AnnotationOS] = "debian"
		image = "debian"
	}
	if b.DiskSize > 0 {
		ann[kubenode.AnnotationDiskMiB] = strconv.Itoa(b.DiskSize)
	}
	if req.Network.Mode != "" {
		ann[kubenode.AnnotationNetwork] = string(req.Network.Mode)
	}
	if len(req.Network.Allow) > 0 {
		ann[kubenode.AnnotationAllow] = joinPrefixes(req.Network.Allow)
	}
	memory := *resource.NewQuantity(int64(cmp.Or(b.Memory, 512))<<20, resource.BinarySI)
	cpus := *resource.NewQuantity(int64(cmp.Or(b.VCPUs, 1)), resource.DecimalSI)
	c := corev1.Container{
		Name:  "vm",
		Image: image,
		Resources: corev1.ResourceRequirements{
			Limits:   corev1.ResourceList{corev1.ResourceMemory: memory, corev1.ResourceCPU: cpus},
			Requests: corev1.ResourceList{corev1.ResourceMemory: memory, corev1.ResourceCPU: cpus},
		},
	}
	for _, p := range b.Ports {
		c.Ports = append(c.Ports, corev1.ContainerPort{ContainerPort: int32(p.Guest), HostPort: int32(p.Host), HostIP: p.HostAddress, Protocol: corev1.ProtocolTCP})
	}
	for _, k := range slices.Sorted(maps.Keys(b.Env)) {
		c.Env = append(c.Env, corev1.EnvVar{Name: k, Value: b.Env[k]})
	}
	no := false
	return &corev1.PodTemplateSpec{
		ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{LabelManagedBy: managedBy}, Annotations: ann},
		Spec: corev1.PodSpec{
			RuntimeClassName:             &class,
			Containers:                   []corev1.Container{c},
			AutomountServiceAccountToken: &no,
			RestartPolicy:                corev1.RestartPolicyNever,
		},
	}, nil
}

func joinPrefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

func shutdownTime(seconds int) string {
	return time.Now().Add(time.Duration(seconds) * time.Second).UTC().Format(time.RFC3339)
}

func preferAsync(h string) bool {
	for _, p := range strings.Split(h, ",") {
		if strings.EqualFold(strings.TrimSpace(p), "respond-async") {
			return true
		}
	}
	return false
}

// problem is an error the gateway answers with as is.
type problem struct {
	status     int
	code, text string
}

func (p *problem) Error() string { return p.text }

// writeError answers with err's problem.
func (g *Gateway) writeError(w http.ResponseWriter, r *http.Request, err error) {
	var p *problem
	var ap *api.Problem
	var se *sandbox.Error
	var status apierrors.APIStatus
	switch {
	case errors.As(err, &p):
		api.WriteProblem(w, r, p.status, p.code, p.text)
	case errors.As(err, &ap):
		ap.Write(w, r)
	case errors.As(err, &se):
		api.ProblemFrom(r.Context(), se).Write(w, r)
	case errors.As(err, &status) && (apierrors.IsForbidden(err) || apierrors.IsUnauthorized(err)):
		api.WriteProblem(w, r, http.StatusBadGateway, CodeKubernetes, "the API server refused the gateway: "+err.Error())
	case r.Context().Err() != nil:
		api.WriteProblem(w, r, http.StatusServiceUnavailable, api.CodeShuttingDown, "the request was cancelled: "+err.Error())
	default:
		g.log.Error("a Kubernetes call failed", "path", r.URL.Path, "err", err)
		api.WriteProblem(w, r, http.StatusBadGateway, CodeKubernetes, err.Error())
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	enc.Encode(v)
}
