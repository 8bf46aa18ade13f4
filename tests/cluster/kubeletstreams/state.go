package kubeletstreams

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
)

// PodState is what the process kubelet (tests/cluster, Python) writes for each pod it runs, atomically (temp file
// + rename), at STATE_DIR/pods/<namespace>/<pod name>.json. It is the only channel between the two: this server
// never learns about pods any other way.
type PodState struct {
	UID        string                    `json:"uid"`
	IP         string                    `json:"ip"`
	Containers map[string]ContainerState `json:"containers"`
}

// ContainerState names the log files of one container. Log files are plain text as the process wrote it (stdout
// and stderr interleaved), so timestamps are not known per line.
type ContainerState struct {
	Log         string  `json:"log"`          // the current instance's log (absolute path)
	PreviousLog *string `json:"previous_log"` // the last terminated instance's log, null before the first restart
	Running     bool    `json:"running"`
}

// errNotFound marks a pod or container the state directory does not know (404, as the kubelet answers).
var errNotFound = errors.New("not found")

// Names in the URL become path elements: accept only what Kubernetes accepts for namespaces and pod names (DNS
// subdomains), so "..", "/" and the like can never leave the state directory.
var objectName = regexp.MustCompile(`^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$`)

type stateDir string

func (d stateDir) podFile(namespace, pod string) (string, error) {
	if !objectName.MatchString(namespace) || !objectName.MatchString(pod) {
		return "", fmt.Errorf("pod %q does not exist: %w", pod, errNotFound)
	}
	return filepath.Join(string(d), "pods", namespace, pod+".json"), nil
}

// pod reads one pod's state; a pod without a state file does not exist on this node.
func (d stateDir) pod(namespace, pod string) (*PodState, error) {
	path, err := d.podFile(namespace, pod)
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("pod %q does not exist: %w", pod, errNotFound)
	}
	if err != nil {
		return nil, err
	}
	var state PodState
	if err := json.Unmarshal(data, &state); err != nil {
		return nil, fmt.Errorf("state of pod %s/%s (%s): %w", namespace, pod, path, err)
	}
	return &state, nil
}

// container reads one container's state, with the kubelet's messages for what is missing.
func (d stateDir) container(namespace, pod, container string) (*PodState, ContainerState, error) {
	state, err := d.pod(namespace, pod)
	if err != nil {
		return nil, ContainerState{}, err
	}
	c, ok := state.Containers[container]
	if !ok {
		return nil, ContainerState{}, fmt.Errorf("container %q not found in pod %q: %w", container, pod, errNotFound)
	}
	return state, c, nil
}
