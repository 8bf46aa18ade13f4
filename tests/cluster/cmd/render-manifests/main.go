// Command render-manifests renders a kustomization (an operator's own install overlay, from the Go module cache)
// with kustomize's library, exactly as `kubectl apply -k` would, and splits the result into one JSON file per
// object, so the test harness applies what upstream installs (the webhook configurations with their patches and
// selectors, the CRDs with their conversion settings) without a YAML parser and without copying upstream files.
//
//	render-manifests -o OUT DIR
//
// OUT/crds/*.json, OUT/webhooks/*.json (Mutating/ValidatingWebhookConfiguration), OUT/namespaces/*.json and
// OUT/other/*.json (everything else: Deployment, RBAC, Services, for reference; the harness does not apply them).
// It prints a JSON index of what it wrote, with every clientConfig.service reference found (webhooks, CRD
// conversion, APIService), which build.py folds into manifest.json.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

type object struct {
	File      string `json:"file"`
	Kind      string `json:"kind"`
	Name      string `json:"name"`
	Namespace string `json:"namespace,omitempty"`
}

// serviceRef is one clientConfig.service found in a rendered object: the harness replaces it with
// clientConfig.url = https://127.0.0.1:<webhook port><path> and its own caBundle.
type serviceRef struct {
	File      string `json:"file"`
	Kind      string `json:"kind"`
	Object    string `json:"object"`
	Webhook   string `json:"webhook,omitempty"` // the webhook's name inside a webhook configuration
	Namespace string `json:"namespace"`
	Service   string `json:"service"`
	Path      string `json:"path,omitempty"`
	Port      int64  `json:"port,omitempty"`
}

type index struct {
	Objects  []object     `json:"objects"`
	Services []serviceRef `json:"service_refs"`
}

func main() {
	out := flag.String("o", "", "output folder (created)")
	flag.Parse()
	if *out == "" || flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: render-manifests -o OUT KUSTOMIZATION_DIR")
		os.Exit(2)
	}
	idx, err := render(flag.Arg(0), *out)
	if err != nil {
		fmt.Fprintln(os.Stderr, "render-manifests:", err)
		os.Exit(1)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", " ")
	if err := enc.Encode(idx); err != nil {
		os.Exit(1)
	}
}

func render(dir, out string) (*index, error) {
	opts := krusty.MakeDefaultOptions()
	// build.py writes small overlays of its own next to the output that name upstream folders by absolute path.
	opts.LoadRestrictions = types.LoadRestrictionsNone
	resources, err := krusty.MakeKustomizer(opts).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return nil, err
	}
	idx := &index{Objects: []object{}, Services: []serviceRef{}}
	for _, res := range resources.Resources() {
		m, err := res.Map()
		if err != nil {
			return nil, err
		}
		kind, name, namespace := res.GetKind(), res.GetName(), res.GetNamespace()
		folder := "other"
		switch kind {
		case "CustomResourceDefinition":
			folder = "crds"
		case "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration":
			folder = "webhooks"
		case "Namespace":
			folder = "namespaces"
		}
		base := strings.ToLower(kind) + "-" + name
		if namespace != "" {
			base = strings.ToLower(kind) + "-" + namespace + "-" + name
		}
		if folder == "crds" || folder == "namespaces" {
			base = name
		}
		file := filepath.Join(folder, base+".json")
		data, err := json.MarshalIndent(m, "", "  ")
		if err != nil {
			return nil, err
		}
		if err := os.MkdirAll(filepath.Join(out, folder), 0o755); err != nil {
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(out, file), append(data, '\n'), 0o644); err != nil {
			return nil, err
		}
		idx.Objects = append(idx.Objects, object{File: file, Kind: kind, Name: name, Namespace: namespace})
		idx.Services = append(idx.Services, serviceRefs(file, kind, name, m)...)
	}
	sort.Slice(idx.Objects, func(i, j int) bool { return idx.Objects[i].File < idx.Objects[j].File })
	return idx, nil
}

// serviceRefs finds the clientConfig.service references of webhook configurations, CRD conversion webhooks and
// APIServices.
func serviceRefs(file, kind, name string, m map[string]any) []serviceRef {
	var refs []serviceRef
	add := func(webhook string, service map[string]any, path string) {
		if service == nil {
			return
		}
		ref := serviceRef{File: file, Kind: kind, Object: name, Webhook: webhook, Path: path}
		ref.Namespace, _ = service["namespace"].(string)
		ref.Service, _ = service["name"].(string)
		if p, ok := service["path"].(string); ok {
			ref.Path = p
		}
		switch port := service["port"].(type) {
		case int64:
			ref.Port = port
		case float64:
			ref.Port = int64(port)
		case int:
			ref.Port = int64(port)
		}
		refs = append(refs, ref)
	}
	switch kind {
	case "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration":
		webhooks, _ := m["webhooks"].([]any)
		for _, w := range webhooks {
			wh, _ := w.(map[string]any)
			cc, _ := wh["clientConfig"].(map[string]any)
			svc, _ := cc["service"].(map[string]any)
			whName, _ := wh["name"].(string)
			add(whName, svc, "")
		}
	case "CustomResourceDefinition":
		spec, _ := m["spec"].(map[string]any)
		conv, _ := spec["conversion"].(map[string]any)
		wh, _ := conv["webhook"].(map[string]any)
		cc, _ := wh["clientConfig"].(map[string]any)
		svc, _ := cc["service"].(map[string]any)
		add("", svc, "")
	case "APIService":
		spec, _ := m["spec"].(map[string]any)
		svc, _ := spec["service"].(map[string]any)
		add("", svc, "")
	}
	return refs
}
