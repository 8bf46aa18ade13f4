// Command kubeplane is one binary for the whole test control plane: each upstream component's own command
// constructor behind a subcommand, so the components share one build (about 200 MB instead of 4 x 120 MB) and one
// link step.
//
//	kubeplane etcd ARGS                     go.etcd.io/etcd/server/v3/etcdmain
//	kubeplane kube-apiserver ARGS           k8s.io/kubernetes/cmd/kube-apiserver
//	kubeplane kube-controller-manager ARGS  k8s.io/kubernetes/cmd/kube-controller-manager
//	kubeplane kube-scheduler ARGS           k8s.io/kubernetes/cmd/kube-scheduler
//	kubeplane kubelet-streams ARGS          the kubelet's log and port-forward endpoints (package kubeletstreams)
//	kubeplane version                       the versions built in, as JSON
//
// ARGS pass through unchanged and the component's exit code is kept. Called through a symlink named after a
// component (e.g. bin/kube-apiserver -> kubeplane), it runs that component.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	"k8s.io/component-base/version"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	kcm "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"

	"ddpm-trainer/tests/cluster/kubeletstreams"
)

const usage = "usage: kubeplane etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kubelet-streams|version [ARGS]"

func main() {
	name, args := filepath.Base(os.Args[0]), os.Args[1:]
	if name == "kubeplane" {
		if len(args) == 0 {
			fmt.Fprintln(os.Stderr, usage)
			os.Exit(2)
		}
		name, args = args[0], args[1:]
	}
	os.Exit(run(name, args))
}

func run(name string, args []string) int {
	switch name {
	case "etcd":
		// etcdmain.Main parses os.Args[1:] itself and exits the process on its own.
		etcdmain.Main(append([]string{"etcd"}, args...))
		return 0
	case "kube-apiserver":
		return runCobra(apiserver.NewAPIServerCommand(), args)
	case "kube-controller-manager":
		return runCobra(kcm.NewControllerManagerCommand(), args)
	case "kube-scheduler":
		return runCobra(scheduler.NewSchedulerCommand(), args)
	case "kubelet-streams":
		return kubeletstreams.Main(args)
	case "version", "--version", "-version":
		return printVersions()
	}
	fmt.Fprintf(os.Stderr, "kubeplane: unknown component %q\n%s\n", name, usage)
	return 2
}

// runCobra runs an upstream command constructor the way its own main does (component-base's cli.Run sets up
// logging and flag normalisation) and returns its exit code.
func runCobra(cmd *cobra.Command, args []string) int {
	cmd.SetArgs(args)
	return cli.Run(cmd)
}

// printVersions prints the versions of the modules this binary was built from (from the build info, so it cannot
// disagree with go.mod) and the version the Kubernetes components report (set by build.py through -ldflags).
func printVersions() int {
	out := map[string]string{"go": runtime.Version(), "kubernetes-reported": version.Get().GitVersion}
	if info, ok := debug.ReadBuildInfo(); ok {
		names := map[string]string{
			"k8s.io/kubernetes":         "kubernetes",
			"go.etcd.io/etcd/server/v3": "etcd",
			"k8s.io/cri-streaming":      "cri-streaming",
			"k8s.io/apimachinery":       "apimachinery",
		}
		for _, dep := range info.Deps {
			key, wanted := names[dep.Path]
			if !wanted {
				continue
			}
			v := dep.Version
			if dep.Replace != nil {
				v = dep.Replace.Version
			}
			out[key] = v
		}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		return 1
	}
	return 0
}
