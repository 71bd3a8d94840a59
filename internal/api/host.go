package api

import (
	"context"
	"net/http"
	"slices"
	"strings"

	"github.com/danielgtaylor/huma/v2"

	"github.com/smolvm/smolvm/internal/doctor"
	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/network"
)

// Capabilities is the body of GET /capabilities.
type Capabilities struct {
	APIVersion   string              `json:"api_version" example:"1.0.0" doc:"Version of this HTTP interface (the OpenAPI document's info.version)."`
	Backends     []BackendCapability `json:"backends" nullable:"false" doc:"Every backend the API names, whether this host can run it, and why not."`
	OS           []OSCapability      `json:"os" nullable:"false" doc:"The values of os on create, whether this host can run them, and the image each boots."`
	NetworkModes []string            `json:"network_modes" nullable:"false" example:"[\"open\",\"off\",\"restricted\"]" doc:"The values of network.mode on create."`
	Routes       []string            `json:"routes" nullable:"false" example:"[\"POST /sandboxes\",\"GET /capabilities\"]" doc:"Every operation this server serves, as METHOD /path."`
}

// BackendCapability is one backend on this host.
type BackendCapability struct {
	Name      string `json:"name" example:"qemu" doc:"Backend name, as create's backend takes it."`
	Available bool   `json:"available" example:"true" doc:"Whether sandboxes can be created with it here."`
	Default   bool   `json:"default" example:"true" doc:"Whether create uses it when backend is omitted."`
	Reason    string `json:"reason,omitempty" example:"this build of smolvm has no firecracker driver; it runs sandboxes with qemu" doc:"When not available: what is missing, and what to do."`
}

// OSCapability is one value of create's os.
type OSCapability struct {
	Name      string `json:"name" example:"alpine" doc:"The os value."`
	Available bool   `json:"available" example:"true" doc:"Whether sandboxes of it can be created here."`
	Image     string `json:"image,omitempty" example:"alpine:3.20" doc:"The image it boots: an OCI reference, or debian-bookworm for the default image built on this host."`
	Reason    string `json:"reason,omitempty" example:"windows guests are not supported yet" doc:"When not available: why."`
}

// Diagnostics is the body of GET /diagnostics.
type Diagnostics struct {
	Ready       bool              `json:"ready" example:"true" doc:"Whether every check that smolvm needs passed: sandboxes can be created."`
	Accelerator string            `json:"accelerator" example:"tcg" doc:"The accelerator VMs run with: kvm, or tcg (software emulation)."`
	Checks      []DiagnosticCheck `json:"checks" nullable:"false" doc:"The checks of smolvm doctor, in its order."`
}

// DiagnosticCheck is one host check.
type DiagnosticCheck struct {
	Name   string `json:"name" example:"qemu-system-x86_64" doc:"What was checked."`
	Status string `json:"status" enum:"ok,warn,missing" example:"ok" doc:"ok; warn: works, slower or built later on demand; missing: smolvm cannot work until it is fixed."`
	Detail string `json:"detail" example:"QEMU emulator version 7.2.22" doc:"What was found."`
	Fix    string `json:"fix,omitempty" example:"apt-get install qemu-system-x86" doc:"For anything not ok: the command that fixes it."`
}

type capabilitiesOutput struct{ Body Capabilities }
type diagnosticsOutput struct{ Body Diagnostics }

func registerHost(hapi huma.API, h *handlers, common []int) {
	huma.Register(hapi, huma.Operation{
		OperationID: "getCapabilities",
		Method:      http.MethodGet,
		Path:        "/capabilities",
		Summary:     "What this server supports",
		Description: "Lists the backends, operating systems and network modes create accepts, whether this host can run each (and why not), and the operations this server serves.",
		Tags:        []string{"host"},
		Errors:      common,
	}, h.capabilities)
	huma.Register(hapi, huma.Operation{
		OperationID: "getDiagnostics",
		Method:      http.MethodGet,
		Path:        "/diagnostics",
		Summary:     "Host checks",
		Description: "Runs the checks of `smolvm doctor` (host programs, guest kernel, default image, accelerator, data directory) and answers them as JSON, with the command that fixes anything missing.",
		Tags:        []string{"host"},
		Errors:      common,
	}, h.diagnostics)
}

func (h *handlers) capabilities(ctx context.Context, _ *struct{}) (*capabilitiesOutput, error) {
	m, err := h.manager("")
	if err != nil {
		return nil, err
	}
	c := Capabilities{
		APIVersion:   APIVersion,
		NetworkModes: []string{string(network.ModeOpen), string(network.ModeOff), string(network.ModeRestricted)},
		Routes:       slices.Clone(h.routes),
	}
	for _, b := range m.Backends() {
		c.Backends = append(c.Backends, BackendCapability{Name: b.Name, Available: b.Available, Default: b.Default, Reason: b.Reason})
	}
	c.OS = append(c.OS, OSCapability{Name: "debian", Available: true, Image: "debian-bookworm"})
	for _, os := range []string{"alpine", "ubuntu"} {
		ref, _ := image.Preset(os)
		c.OS = append(c.OS, OSCapability{Name: os, Available: true, Image: ref})
	}
	c.OS = append(c.OS, OSCapability{Name: "windows", Reason: "windows guests are not supported yet"})
	return &capabilitiesOutput{Body: c}, nil
}

func (h *handlers) diagnostics(ctx context.Context, _ *struct{}) (*diagnosticsOutput, error) {
	m, err := h.manager("")
	if err != nil {
		return nil, err
	}
	checks := doctor.Run(ctx, m.DataDir(), m.Helpers())
	var backends []doctor.Backend
	for _, b := range m.Backends() {
		backends = append(backends, doctor.Backend{Name: b.Name, Reason: b.Reason, Default: b.Default})
	}
	checks = append(checks, doctor.BackendChecks(backends)...)
	d := Diagnostics{Ready: !doctor.AnyMissing(checks)}
	d.Accelerator, _ = doctor.Accelerator()
	for _, c := range checks {
		d.Checks = append(d.Checks, DiagnosticCheck{Name: c.Name, Status: c.Status, Detail: c.Detail, Fix: c.Fix})
	}
	return &diagnosticsOutput{Body: d}, nil
}

// operations lists the document's operations as METHOD /path, sorted.
func operations(doc *huma.OpenAPI) []string {
	var out []string
	for path, item := range doc.Paths {
		for method, op := range map[string]*huma.Operation{
			http.MethodGet: item.Get, http.MethodPost: item.Post, http.MethodPut: item.Put,
			http.MethodPatch: item.Patch, http.MethodDelete: item.Delete,
		} {
			if op != nil {
				out = append(out, method+" "+path)
			}
		}
	}
	slices.SortFunc(out, func(a, b string) int {
		_, pa, _ := strings.Cut(a, " ")
		_, pb, _ := strings.Cut(b, " ")
		if c := strings.Compare(pa, pb); c != 0 {
			return c
		}
		return strings.Compare(a, b)
	})
	return out
}
