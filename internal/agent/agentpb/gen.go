// Package agentpb is the guest agent's API: agent.proto and the code
// protoc generates from it (committed; a test fails when it is stale).
// Regenerate with `go generate ./internal/agent/agentpb`, which needs
// protoc (Debian's protobuf-compiler) and the plugins named in go.mod's
// tool block.
package agentpb

//go:generate sh -c "protoc --plugin=protoc-gen-go=$(go tool -n protoc-gen-go) --plugin=protoc-gen-connect-go=$(go tool -n protoc-gen-connect-go) --go_out=. --go_opt=paths=source_relative --connect-go_out=. --connect-go_opt=paths=source_relative agent.proto"
