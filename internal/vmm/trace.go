package vmm

import (
	"context"
	"time"
)

// StepFunc receives how long one named step of starting a machine took.
type StepFunc func(step string, took time.Duration)

type stepsKey struct{}

// WithSteps returns a context whose machine starts report each step to f,
// as net/http/httptrace does for requests: the benchmark breaks a create
// down with it, and nothing is recorded when no caller asks.
func WithSteps(ctx context.Context, f StepFunc) context.Context {
	return context.WithValue(ctx, stepsKey{}, f)
}

// Step reports the time since start as step to the context's StepFunc, if
// it has one, and returns the time now, the start of the next step.
func Step(ctx context.Context, step string, start time.Time) time.Time {
	now := time.Now()
	if f, ok := ctx.Value(stepsKey{}).(StepFunc); ok && f != nil {
		f(step, now.Sub(start))
	}
	return now
}
