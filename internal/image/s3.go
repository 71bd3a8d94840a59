package image

import (
	"context"
	"crypto/md5"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/smithy-go"

	"github.com/smolvm/smolvm/internal/datadir"
)

// resolveS3 returns the entry for an S3 object holding an ext4, qcow2 or
// tarball, keyed by endpoint, bucket, key and ETag.
func resolveS3(ctx context.Context, d datadir.Dir, s *source, o Options, rep *reporter) (*Base, error) {
	rec, recorded := readRef(d, s.canonical)
	if recorded && !o.Refresh {
		if b, err := loadEntry(d, rec.Entry); err == nil {
			return b, nil
		}
	}
	where := "S3"
	if s.endpoint != "" {
		where = s.endpoint
	}

	rt := httpTransport(o)
	defer closeIdle(rt)
	rep.phase(PhaseResolve, 0)
	rep.logf("resolving %s (%s)...", s.ref, where)
	client, etag, size, err := headS3(ctx, s, o, rt, rep)
	if err != nil {
		cerr := classifyS3(ctx, s.ref, where, err)
		if e, ok := AsError(cerr); ok && e.Code == CodeRegistryUnreachable && recorded {
			if b, lerr := loadEntry(d, rec.Entry); lerr == nil {
				rep.logf("%s unreachable (%v); using the cached %s fetched %s", where, err, s.ref, rec.ResolvedAt.Local().Format(time.RFC3339))
				return b, nil
			}
		}
		return nil, cerr
	}

	sum := sha256.Sum256([]byte(s.endpoint + "\n" + s.bucket + "\n" + s.key + "\n" + etag))
	id := "s3-" + hex.EncodeToString(sum[:])
	b, _, err := ensureEntry(ctx, d, id, rep, func(ctx context.Context, work, out string) (*entryMeta, error) {
		start := time.Now()
		src := filepath.Join(work, "source")
		if err := getS3(ctx, client, s, etag, size, src, rep); err != nil {
			return nil, err
		}
		m, err := buildFromData(ctx, work, src, out, s.ref, rep)
		if err != nil {
			return nil, err
		}
		m.Kind, m.Name, m.Ref = KindS3, s.ref, s.ref
		m.Source, m.SourceDigest = s.ref, etag
		rep.logf("image %s built in %s", s.ref, time.Since(start).Round(time.Millisecond))
		return m, nil
	})
	if err != nil {
		if e, ok := AsError(err); ok {
			return nil, e
		}
		if isCorrupt(err) {
			return nil, buildFailed(s.ref, err)
		}
		var ae smithy.APIError
		if isNetworkError(err) || errors.As(err, &ae) {
			return nil, classifyS3(ctx, s.ref, where, err)
		}
		return nil, buildFailed(s.ref, err)
	}
	if err := writeRef(d, refRecord{Ref: s.canonical, Given: s.ref, Entry: id, Digest: etag, ResolvedAt: time.Now().UTC()}); err != nil {
		rep.logf("warning: could not record %s: %v", s.ref, err)
	}
	return b, nil
}

// headS3 makes a client from the standard AWS configuration (environment,
// shared files, instance roles) and asks for the object's ETag and size,
// within the resolve bound.
func headS3(ctx context.Context, s *source, o Options, rt http.RoundTripper, rep *reporter) (*s3.Client, string, int64, error) {
	rctx, cancel := context.WithTimeoutCause(ctx, o.resolveBound(),
		&unreachableError{err: fmt.Errorf("no answer within %s", o.resolveBound())})
	defer cancel()
	// The SDK applies AWS_CA_BUNDLE only to its own client type; load with
	// one, then carry its TLS settings over to our bounded transport.
	cfg, err := config.LoadDefaultConfig(rctx,
		config.WithHTTPClient(awshttp.NewBuildableClient()),
		config.WithRetryMaxAttempts(3),
		config.WithRequestChecksumCalculation(aws.RequestChecksumCalculationWhenRequired),
		config.WithResponseChecksumValidation(aws.ResponseChecksumValidationWhenRequired),
	)
	if err != nil {
		return nil, "", 0, fmt.Errorf("load AWS configuration: %w", err)
	}
	if bc, ok := cfg.HTTPClient.(*awshttp.BuildableClient); ok {
		if tc := bc.GetTransport().TLSClientConfig; tc != nil {
			if st, ok := rt.(*stallTransport); ok {
				if t, ok := st.base.(*http.Transport); ok {
					t.TLSClientConfig = tc.Clone()
				}
			}
		}
	}
	cfg.HTTPClient = &http.Client{Transport: rt}
	if cfg.Region == "" {
		// Custom stores ignore it; AWS redirects are not followed, so a
		// bucket elsewhere needs AWS_REGION.
		cfg.Region = "us-east-1"
	}
	if _, err := cfg.Credentials.Retrieve(rctx); err != nil {
		if rctx.Err() != nil {
			return nil, "", 0, stageError(rctx, err)
		}
		rep.logf("no AWS credentials found (%v); trying anonymous access", err)
		cfg.Credentials = aws.AnonymousCredentials{}
	}
	client := s3.NewFromConfig(cfg, func(so *s3.Options) {
		if s.endpoint != "" {
			so.BaseEndpoint = aws.String(s.endpoint)
			so.UsePathStyle = true
		}
		so.DisableLogOutputChecksumValidationSkipped = true
	})
	head, err := client.HeadObject(rctx, &s3.HeadObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(s.key)})
	if err != nil {
		return nil, "", 0, stageError(rctx, err)
	}
	etag := aws.ToString(head.ETag)
	if etag == "" {
		return nil, "", 0, fmt.Errorf("%s has no ETag", s.ref)
	}
	return client, etag, aws.ToInt64(head.ContentLength), nil
}

// plainMD5 returns the MD5 an ETag holds, if it is one: objects uploaded in
// parts have ETags of another form.
func plainMD5(etag string) (string, bool) {
	e := strings.Trim(etag, `"`)
	if len(e) != 32 {
		return "", false
	}
	if _, err := hex.DecodeString(e); err != nil {
		return "", false
	}
	return strings.ToLower(e), true
}

// getS3 downloads the object version with etag to dst, checking its size
// and, when the ETag is a plain MD5 (not a multipart upload), its MD5.
func getS3(ctx context.Context, client *s3.Client, s *source, etag string, size int64, dst string, rep *reporter) error {
	rep.phase(PhasePull, size)
	rep.logf("downloading %s (%.1f MiB)...", s.ref, float64(size)/(1<<20))
	obj, err := client.GetObject(ctx, &s3.GetObjectInput{
		Bucket: aws.String(s.bucket), Key: aws.String(s.key), IfMatch: aws.String(etag),
	})
	if err != nil {
		return err
	}
	defer obj.Body.Close()
	hr := &hashedReader{r: obj.Body, h: md5.New()}
	if err := writeSparseFile(dst, hr, rep); err != nil {
		return err
	}
	if hr.n != size {
		return corrupt("%s: got %d bytes, want %d", s.ref, hr.n, size)
	}
	if want, ok := plainMD5(etag); ok {
		if got := hex.EncodeToString(hr.h.Sum(nil)); got != want {
			return corrupt("%s: content has MD5 %s, ETag says %s", s.ref, got, want)
		}
	}
	return nil
}

// classifyS3 turns an S3 failure into an *Error.
func classifyS3(ctx context.Context, ref, where string, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("fetch %s: %w", ref, ctx.Err())
	}
	if e, ok := AsError(err); ok {
		return e
	}
	if isCorrupt(err) {
		return newError(CodeCorrupt, ref, err, "the download of %s was damaged: try again", ref)
	}
	var ae smithy.APIError
	if errors.As(err, &ae) {
		switch ae.ErrorCode() {
		case "NoSuchKey", "NotFound", "NoSuchBucket":
			return newError(CodeNotFound, ref, err, "%s not found at %s: check the bucket and key", ref, where)
		case "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "AllAccessDisabled":
			return newError(CodeUnauthorized, ref, err, "%s refused access to %s: check the AWS credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE) and the bucket's policy", where, ref)
		case "PreconditionFailed":
			return newError(CodeBuildFailed, ref, err, "%s changed while it was downloaded: try again", ref)
		}
	}
	var se interface{ HTTPStatusCode() int }
	if errors.As(err, &se) {
		switch code := se.HTTPStatusCode(); {
		case code == http.StatusNotFound:
			return newError(CodeNotFound, ref, err, "%s not found at %s: check the bucket and key", ref, where)
		case code == http.StatusUnauthorized || code == http.StatusForbidden:
			return newError(CodeUnauthorized, ref, err, "%s refused access to %s: check the AWS credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE) and the bucket's policy", where, ref)
		case code == http.StatusPreconditionFailed:
			return newError(CodeBuildFailed, ref, err, "%s changed while it was downloaded: try again", ref)
		}
	}
	if isNetworkError(err) {
		return newError(CodeRegistryUnreachable, ref, err, "cannot reach %s for %s: check the network and the endpoint (SMOLVM_S3_ENDPOINT)", where, ref)
	}
	return newError(CodeRegistryUnreachable, ref, err, "fetching %s from %s failed", ref, where)
}
