//go:build tools

// Package tools pins prometheus-nats-exporter: go.mod names its version, go.sum its dependencies.
// The module's own version list is not served by the proxy here (so `go install ...@v` fails on
// its deprecation check); building it as a dependency of this module needs only the exact version.
package tools

import _ "github.com/nats-io/prometheus-nats-exporter"
