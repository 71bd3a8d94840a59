package image

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"syscall"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// Error codes, stable for API clients.
const (
	CodeInvalidRef          = "invalid_image_ref"
	CodeNotFound            = "image_not_found"
	CodeUnauthorized        = "image_unauthorized"
	CodeRegistryUnreachable = "registry_unreachable"
	CodeCorrupt             = "image_corrupt"
	CodeUnsupported         = "unsupported_image"
	CodeBuildFailed         = "image_build_failed"
)

// Error is a failure to resolve an image, with a stable code. Message says
// what went wrong and what to do; Err is the underlying cause.
type Error struct {
	Code    string
	Message string
	Ref     string
	Err     error
}

// Error is one line: the message, then the cause.
func (e *Error) Error() string {
	msg := e.Message
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	return oneLine(msg)
}

func (e *Error) Unwrap() error { return e.Err }

// AsError returns the *Error in err's chain, if any.
func AsError(err error) (*Error, bool) {
	var e *Error
	ok := errors.As(err, &e)
	return e, ok
}

func newError(code, ref string, err error, format string, args ...any) *Error {
	return &Error{Code: code, Ref: ref, Err: err, Message: fmt.Sprintf(format, args...)}
}

// oneLine folds multi-line tool output into one line for CLI and API errors.
func oneLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for i := range lines {
		lines[i] = strings.TrimSpace(lines[i])
	}
	return strings.Join(lines, "; ")
}

// corruptError marks a failure caused by the bytes of an image (bad digest,
// unreadable archive, unsafe path) rather than by the host.
type corruptError struct{ err error }

func (c *corruptError) Error() string { return c.err.Error() }
func (c *corruptError) Unwrap() error { return c.err }

func corrupt(format string, args ...any) error {
	return &corruptError{err: fmt.Errorf(format, args...)}
}

func isCorrupt(err error) bool {
	var c *corruptError
	return errors.As(err, &c)
}

// unreachableError marks a network failure: no connection, a timeout, a
// stalled transfer.
type unreachableError struct{ err error }

func (u *unreachableError) Error() string { return u.err.Error() }
func (u *unreachableError) Unwrap() error { return u.err }

// classifyRegistry turns an error from talking to a registry into an *Error.
// what names the registry (host) for the message. The caller's own context
// having ended is returned unchanged, so errors.Is(err, context.Canceled)
// keeps working.
func classifyRegistry(ctx context.Context, ref, registry string, err error) error {
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return fmt.Errorf("pull %s: %w", ref, ctx.Err())
	}
	if e, ok := AsError(err); ok {
		return e
	}
	// Writing what was pulled failed: the registry is not at fault.
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("pull %s: %w", ref, err)
	}
	if isCorrupt(err) {
		return newError(CodeCorrupt, ref, err, "image %s from %s is corrupt (content does not match its digest); pull it again, and if it persists the registry holds a damaged image", ref, registry)
	}
	var te *transport.Error
	if errors.As(err, &te) {
		codes := map[transport.ErrorCode]bool{}
		for _, d := range te.Errors {
			codes[d.Code] = true
		}
		switch {
		case te.StatusCode == http.StatusUnauthorized || te.StatusCode == http.StatusForbidden ||
			codes[transport.UnauthorizedErrorCode] || codes[transport.DeniedErrorCode]:
			return newError(CodeUnauthorized, ref, err, "registry %s refused access to %s: the image does not exist or needs credentials (log in with `docker login %s`)", registry, ref, registry)
		case codes[transport.BlobUnknownErrorCode]:
			return newError(CodeCorrupt, ref, err, "registry %s lacks a layer of %s: the image is incomplete there", registry, ref)
		case te.StatusCode == http.StatusNotFound || codes[transport.ManifestUnknownErrorCode] || codes[transport.NameUnknownErrorCode]:
			return newError(CodeNotFound, ref, err, "image %s not found in registry %s: check the name and tag", ref, registry)
		case te.StatusCode == http.StatusTooManyRequests || codes[transport.TooManyRequestsErrorCode]:
			return newError(CodeRegistryUnreachable, ref, err, "registry %s is rate-limiting pulls of %s: try again later, log in, or set a registry mirror (SMOLVM_REGISTRY_MIRROR)", registry, ref)
		case te.StatusCode >= 500:
			return newError(CodeRegistryUnreachable, ref, err, "registry %s failed while serving %s: try again later", registry, ref)
		}
	}
	msg := err.Error()
	// go-containerregistry reports digest and size mismatches as plain errors.
	for _, s := range []string{"error verifying", "does not match requested digest", "does not match expected size"} {
		if strings.Contains(msg, s) {
			return newError(CodeCorrupt, ref, err, "image %s from %s is corrupt (content does not match its digest); pull it again, and if it persists the registry holds a damaged image", ref, registry)
		}
	}
	if isNetworkError(err) {
		hint := "check the network and the registry address"
		if strings.Contains(registry, "docker.io") {
			hint += ", or set a registry mirror (SMOLVM_REGISTRY_MIRROR)"
		}
		return newError(CodeRegistryUnreachable, ref, err, "cannot reach registry %s for %s: %s", registry, ref, hint)
	}
	return newError(CodeRegistryUnreachable, ref, err, "pulling %s from %s failed", ref, registry)
}

// isNetworkError reports failures of the connection itself: refused,
// unresolvable, timed out, TLS not trusted, or a stage deadline of ours.
func isNetworkError(err error) bool {
	var ne net.Error
	var ue *unreachableError
	var ce *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var he x509.HostnameError
	return errors.As(err, &ne) || errors.As(err, &ue) || errors.As(err, &ce) ||
		errors.As(err, &ua) || errors.As(err, &he) ||
		errors.Is(err, context.DeadlineExceeded)
}

// buildFailed wraps a local failure (disk, tools) after the download.
func buildFailed(ref string, err error) error {
	if e, ok := AsError(err); ok {
		return e
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("build image %s: %w", ref, err)
	}
	if isCorrupt(err) {
		return newError(CodeCorrupt, ref, err, "image %s is corrupt", ref)
	}
	return newError(CodeBuildFailed, ref, err, "building the root filesystem of %s failed", ref)
}
