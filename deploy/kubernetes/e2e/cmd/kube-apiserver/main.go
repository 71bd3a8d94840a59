// Command kube-apiserver is upstream's kube-apiserver, built from the
// k8s.io/kubernetes module pinned in this module's go.mod.
package main

import (
	"os"
	_ "time/tzdata" // CronJob time zone support, as upstream does.

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format.
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics.
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric.
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	os.Exit(cli.Run(app.NewAPIServerCommand()))
}
