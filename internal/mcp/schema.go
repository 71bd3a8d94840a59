package mcp

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
)

// openAPI is the part of the OpenAPI document the tools are built from.
type openAPI struct {
	Paths      map[string]map[string]json.RawMessage `json:"paths"`
	Components struct {
		Schemas map[string]map[string]any `json:"schemas"`
	} `json:"components"`
}

type param struct {
	Name        string         `json:"name"`
	In          string         `json:"in"`
	Required    bool           `json:"required"`
	Description string         `json:"description"`
	Schema      map[string]any `json:"schema"`
}

// operation is one API operation as a tool calls it.
type operation struct {
	method, path string
	params       []param
	hasBody      bool
	body         map[string]any
}

func (d *openAPI) operation(id string) (*operation, error) {
	for path, methods := range d.Paths {
		for method, raw := range methods {
			var o struct {
				OperationID string  `json:"operationId"`
				Parameters  []param `json:"parameters"`
				RequestBody struct {
					Content map[string]struct {
						Schema map[string]any `json:"schema"`
					} `json:"content"`
				} `json:"requestBody"`
			}
			if json.Unmarshal(raw, &o) != nil || o.OperationID != id {
				continue
			}
			op := &operation{method: strings.ToUpper(method), path: path}
			for _, p := range o.Parameters {
				// Header parameters (Prefer, Range) shape the HTTP
				// exchange, which a tool call, one request and one
				// answer, does not expose.
				if p.In == "header" {
					continue
				}
				op.params = append(op.params, p)
			}
			if c, ok := o.RequestBody.Content["application/json"]; ok {
				op.hasBody = true
				op.body = c.Schema
			}
			return op, nil
		}
	}
	return nil, fmt.Errorf("the OpenAPI document has no operation %s", id)
}

// inputSchema is the tool's JSON Schema: one object whose properties are
// the operation's parameters and the properties of its JSON body.
func (d *openAPI) inputSchema(o *operation, t tool) (map[string]any, error) {
	props := map[string]any{}
	var required []string
	if o.hasBody {
		body, err := d.resolve(o.body, 0)
		if err != nil {
			return nil, err
		}
		bm, _ := body.(map[string]any)
		if p, ok := bm["properties"].(map[string]any); ok {
			maps.Copy(props, p)
		}
		if r, ok := bm["required"].([]any); ok {
			for _, n := range r {
				if s, ok := n.(string); ok {
					required = append(required, s)
				}
			}
		}
	}
	for _, p := range o.params {
		if _, dup := props[p.Name]; dup {
			return nil, fmt.Errorf("parameter %s is also a body property", p.Name)
		}
		s, err := d.resolve(p.Schema, 0)
		if err != nil {
			return nil, err
		}
		sm, _ := s.(map[string]any)
		sm = maps.Clone(sm)
		if sm == nil {
			sm = map[string]any{}
		}
		if p.Description != "" {
			sm["description"] = p.Description
		}
		props[p.Name] = sm
		if p.Required {
			required = append(required, p.Name)
		}
	}
	if t.name == "write_file" {
		props["content"] = map[string]any{"type": "string", "description": "What to write: text, or base64 when encoding is base64."}
		props["encoding"] = map[string]any{"type": "string", "enum": []any{"utf-8", "base64"}, "default": "utf-8", "description": "How content is encoded."}
		required = append(required, "content")
	}
	slices.Sort(required)
	s := map[string]any{
		"type":                 "object",
		"properties":           props,
		"additionalProperties": false,
	}
	if len(required) > 0 {
		s["required"] = required
	}
	return s, nil
}

// resolve inlines "#/components/schemas/..." references, so that each tool
// schema stands alone as MCP requires.
func (d *openAPI) resolve(v any, depth int) (any, error) {
	if depth > 32 {
		return nil, fmt.Errorf("schema references nest too deeply")
	}
	switch x := v.(type) {
	case map[string]any:
		if ref, ok := x["$ref"].(string); ok {
			name, found := strings.CutPrefix(ref, "#/components/schemas/")
			target, ok := d.Components.Schemas[name]
			if !found || !ok {
				return nil, fmt.Errorf("unknown schema reference %q", ref)
			}
			return d.resolve(target, depth+1)
		}
		out := make(map[string]any, len(x))
		for k, e := range x {
			r, err := d.resolve(e, depth+1)
			if err != nil {
				return nil, err
			}
			out[k] = r
		}
		return out, nil
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			r, err := d.resolve(e, depth+1)
			if err != nil {
				return nil, err
			}
			out[i] = r
		}
		return out, nil
	}
	return v, nil
}
