//go:build linux

package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiextensionsclient "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
)

// readCRDs decodes every CustomResourceDefinition in the *.yaml files of dir.
func readCRDs(dir string) ([]*apiextensionsv1.CustomResourceDefinition, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		return nil, fmt.Errorf("listing CRDs: %w", err)
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("no CRD manifests in %s; run build.sh", dir)
	}
	slices.Sort(files)
	var crds []*apiextensionsv1.CustomResourceDefinition
	for _, file := range files {
		f, err := os.Open(file)
		if err != nil {
			return nil, fmt.Errorf("opening CRD manifest: %w", err)
		}
		dec := utilyaml.NewYAMLOrJSONDecoder(f, 4096)
		for {
			crd := &apiextensionsv1.CustomResourceDefinition{}
			err := dec.Decode(crd)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				f.Close()
				return nil, fmt.Errorf("decoding %s: %w", file, err)
			}
			if crd.Kind != "CustomResourceDefinition" {
				continue
			}
			crds = append(crds, crd)
		}
		f.Close()
	}
	return crds, nil
}

// withoutConversionWebhook adapts a CRD for a controller running with
// --enable-webhook=false. The shipped CRDs convert between versions through
// the controller's webhook, which does not run here (and would need a
// Service with endpoints to be reached), so conversion is turned off and
// only the storage version is served: serving the other versions without a
// converter would hand clients stored objects relabeled with the wrong
// schema.
func withoutConversionWebhook(crd *apiextensionsv1.CustomResourceDefinition) {
	crd.Spec.Conversion = &apiextensionsv1.CustomResourceConversion{
		Strategy: apiextensionsv1.NoneConverter,
	}
	for i := range crd.Spec.Versions {
		if !crd.Spec.Versions[i].Storage {
			crd.Spec.Versions[i].Served = false
		}
	}
}

// applyCRDs creates crds and waits until the API server serves all of them.
func applyCRDs(ctx context.Context, client apiextensionsclient.Interface, crds []*apiextensionsv1.CustomResourceDefinition) error {
	for _, crd := range crds {
		withoutConversionWebhook(crd)
		if _, err := client.ApiextensionsV1().CustomResourceDefinitions().Create(ctx, crd, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("creating CRD %s: %w", crd.Name, err)
		}
	}
	return nil
}

// crdsEstablished reports, as an error naming the first laggard, whether all
// crds are Established with their names accepted.
func crdsEstablished(ctx context.Context, client apiextensionsclient.Interface, crds []*apiextensionsv1.CustomResourceDefinition) error {
	for _, want := range crds {
		crd, err := client.ApiextensionsV1().CustomResourceDefinitions().Get(ctx, want.Name, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("getting CRD %s: %w", want.Name, err)
		}
		for _, cond := range []apiextensionsv1.CustomResourceDefinitionConditionType{
			apiextensionsv1.NamesAccepted,
			apiextensionsv1.Established,
		} {
			if !crdCondition(crd, cond) {
				return fmt.Errorf("CRD %s is not %s yet", want.Name, cond)
			}
		}
	}
	return nil
}

func crdCondition(crd *apiextensionsv1.CustomResourceDefinition, t apiextensionsv1.CustomResourceDefinitionConditionType) bool {
	for _, c := range crd.Status.Conditions {
		if c.Type == t {
			return c.Status == apiextensionsv1.ConditionTrue
		}
	}
	return false
}
