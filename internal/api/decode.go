package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"reflect"

	"github.com/danielgtaylor/huma/v2"
)

// CreateDecoder reads POST /sandboxes bodies as this package's own route
// does: checked against the schema the OpenAPI document gives, with the
// same problems for what fails. Servers of the same API over another
// backend (the Kubernetes gateway) use it, so a request one accepts the
// other does too.
type CreateDecoder struct {
	reg    huma.Registry
	schema *huma.Schema
}

// NewCreateDecoder builds the schema once.
func NewCreateDecoder() *CreateDecoder {
	hapi, _ := newAPI(http.NewServeMux(), nil)
	reg := hapi.OpenAPI().Components.Schemas
	return &CreateDecoder{reg: reg, schema: reg.Schema(reflect.TypeFor[CreateSandboxRequest](), true, "")}
}

// maxCreateBody bounds a create's body: it holds names, labels and
// environment, never data.
const maxCreateBody = 1 << 20

// Decode reads r's body; an empty body is an empty request. The error is
// a *Problem.
func (d *CreateDecoder) Decode(r *http.Request) (CreateSandboxRequest, error) {
	var body CreateSandboxRequest
	b, err := io.ReadAll(io.LimitReader(r.Body, maxCreateBody+1))
	if err != nil {
		return body, newProblem(http.StatusBadRequest, CodeMalformedJSON, "reading the request body: "+err.Error())
	}
	if len(b) > maxCreateBody {
		return body, newProblem(http.StatusRequestEntityTooLarge, CodeBodyTooLarge, fmt.Sprintf("the request body is over %d bytes", maxCreateBody))
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return body, nil
	}
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return body, newProblem(http.StatusBadRequest, CodeMalformedJSON, "the request body is not valid JSON: "+err.Error())
	}
	res := &huma.ValidateResult{}
	huma.Validate(d.reg, d.schema, bodyPath(), huma.ModeWriteToServer, v, res)
	if len(res.Errors) > 0 {
		details := make([]*huma.ErrorDetail, 0, len(res.Errors))
		for _, e := range res.Errors {
			if d, ok := e.(*huma.ErrorDetail); ok {
				details = append(details, trimDetail(d))
			}
		}
		return body, validationProblem(details)
	}
	if err := json.Unmarshal(b, &body); err != nil {
		return body, newProblem(http.StatusUnprocessableEntity, CodeValidationFailed, "request body: "+err.Error())
	}
	return body, nil
}

// bodyPath is where errors in a body are located, as huma's own
// validation of a route's body locates them ("body.memory").
func bodyPath() *huma.PathBuffer {
	pb := huma.NewPathBuffer(make([]byte, 0, 64), 0)
	pb.Push("body")
	return pb
}
