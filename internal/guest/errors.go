package guest

import "connectrpc.com/connect"

// Code says what kind of answer the agent refused a call with.
type Code string

const (
	CodeInvalid    Code = "invalid"     // the request was malformed
	CodeNotFound   Code = "not_found"   // no such file or process
	CodeExists     Code = "exists"      // already there
	CodeWrongState Code = "wrong_state" // a directory where a file is wanted, a process without stdin
	CodeNoSpace    Code = "no_space"    // the guest's disk is full
	CodeDenied     Code = "denied"      // the guest refused access
	CodeFailed     Code = "failed"      // anything else
)

// Error is the agent's refusal of a call.
type Error struct {
	Code    Code
	Message string
}

func (e *Error) Error() string { return e.Message }

func codeOf(c connect.Code) Code {
	switch c {
	case connect.CodeInvalidArgument, connect.CodeOutOfRange:
		return CodeInvalid
	case connect.CodeNotFound:
		return CodeNotFound
	case connect.CodeAlreadyExists:
		return CodeExists
	case connect.CodeFailedPrecondition:
		return CodeWrongState
	case connect.CodeResourceExhausted:
		return CodeNoSpace
	case connect.CodePermissionDenied:
		return CodeDenied
	}
	return CodeFailed
}

// IsCode reports whether err is the agent's refusal with code c.
func IsCode(err error, c Code) bool {
	e, ok := err.(*Error)
	return ok && e.Code == c
}
