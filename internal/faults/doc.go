// Package faults holds the fault suite: real servers, VMs and network
// processes killed, starved and abused, each case ending with every other
// sandbox still answering, an accurate list, and nothing left behind.
//
// It is built only with the faults tag (go test -tags faults
// ./internal/faults), as the suite is slow; scripts/test.sh runs it.
package faults
