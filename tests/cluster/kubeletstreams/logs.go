package kubeletstreams

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"time"
)

// logOptions are the query parameters of the kubelet's GET /containerLogs/{namespace}/{pod}/{container}, i.e.
// core/v1 PodLogOptions as pkg/kubelet/server/server.go decodes them (k8s.io/kubernetes v1.37.2), including its
// legacy "tail" parameter ("all" means no limit).
//
// Not honoured, because the log files hold the process's bytes without a time for each line:
//   - timestamps: accepted and ignored (no RFC 3339 prefix is added);
//   - sinceSeconds / sinceTime: validated as the kubelet does, then ignored (the whole file is considered).
//   - stream (PodLogsQuerySplitStreams): stdout and stderr are interleaved in one file, so only "All" is served.
type logOptions struct {
	follow     bool
	previous   bool
	tailLines  *int64
	limitBytes *int64
}

// pollInterval is how often a followed log is checked for new bytes and its container for having stopped.
const pollInterval = 100 * time.Millisecond

func parseLogOptions(q url.Values) (logOptions, error) {
	var opts logOptions
	var err error
	boolean := func(name string) bool {
		v := q.Get(name)
		if v == "" || err != nil {
			return false
		}
		b, perr := strconv.ParseBool(v)
		if perr != nil {
			err = fmt.Errorf("%s=%q is not a boolean", name, v)
		}
		return b
	}
	integer := func(name string) *int64 {
		v := q.Get(name)
		if v == "" || err != nil {
			return nil
		}
		n, perr := strconv.ParseInt(v, 10, 64)
		if perr != nil {
			err = fmt.Errorf("%s=%q is not an integer", name, v)
			return nil
		}
		return &n
	}
	opts.follow = boolean("follow")
	opts.previous = boolean("previous")
	boolean("timestamps")
	opts.tailLines = integer("tailLines")
	if tail := q.Get("tail"); tail != "" && tail != "all" && opts.tailLines == nil {
		q = url.Values{"tailLines": {tail}}
		opts.tailLines = integer("tailLines")
	}
	opts.limitBytes = integer("limitBytes")
	sinceSeconds := integer("sinceSeconds")
	if err != nil {
		return opts, &decodeError{err}
	}
	// The checks of ValidatePodLogOptions (pkg/apis/core/validation).
	switch {
	case opts.tailLines != nil && *opts.tailLines < 0:
		return opts, errors.New("tailLines must be greater than or equal to 0")
	case opts.limitBytes != nil && *opts.limitBytes < 1:
		return opts, errors.New("limitBytes must be greater than 0")
	case sinceSeconds != nil && *sinceSeconds < 1:
		return opts, errors.New("sinceSeconds must be greater than 0")
	case sinceSeconds != nil && q.Get("sinceTime") != "":
		return opts, errors.New("at most one of sinceTime or sinceSeconds may be specified")
	}
	if s := q.Get("sinceTime"); s != "" {
		if _, perr := time.Parse(time.RFC3339, s); perr != nil {
			return opts, fmt.Errorf("sinceTime=%q is not an RFC 3339 time", s)
		}
	}
	if s := q.Get("stream"); s != "" && s != "All" {
		return opts, fmt.Errorf("unable to return the given log stream: %q: this node keeps stdout and stderr in one file", s)
	}
	return opts, nil
}

// decodeError is a query that does not parse (400, "Unable to decode query." at the kubelet); other option errors
// are invalid values (422, as ValidatePodLogOptions failing there).
type decodeError struct{ error }

func (s *server) containerLogs(w http.ResponseWriter, r *http.Request) {
	namespace, pod, container := r.PathValue("namespace"), r.PathValue("pod"), r.PathValue("container")
	opts, err := parseLogOptions(r.URL.Query())
	if err != nil {
		code := http.StatusUnprocessableEntity
		if errors.As(err, new(*decodeError)) {
			code = http.StatusBadRequest
		}
		http.Error(w, err.Error(), code)
		return
	}
	_, c, err := s.state.container(namespace, pod, container)
	if err != nil {
		writeStateError(w, err)
		return
	}
	path := c.Log
	if opts.previous {
		if c.PreviousLog == nil || *c.PreviousLog == "" {
			// The kubelet's message (kubelet_pods.go validateContainerLogStatus), answered with 400 as there.
			http.Error(w, fmt.Sprintf("previous terminated container %q in pod %q not found", container, pod), http.StatusBadRequest)
			return
		}
		path = *c.PreviousLog
	}

	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	out := io.Writer(&flushWriter{w: w, f: http.NewResponseController(w)})
	if opts.limitBytes != nil {
		out = &limitWriter{w: out, left: *opts.limitBytes}
	}
	// The previous instance has terminated: its log is complete, so there is nothing to follow.
	follow := opts.follow && !opts.previous
	stillWriting := func() bool {
		_, now, err := s.state.container(namespace, pod, container)
		// The same container instance (same log file) still running; a restart gives the new instance a new file,
		// and a follow of the old one ends, as the kubelet's does when its container exits.
		return err == nil && now.Running && now.Log == path
	}
	if err := streamLog(r.Context(), out, path, opts.tailLines, follow, stillWriting); err != nil && !errors.Is(err, errLimitReached) {
		s.logf("logs %s/%s/%s: %v", namespace, pod, container, err)
	}
}

// streamLog copies the log file at path to out: from the start of its last tailLines lines when given, then, when
// following, every byte appended after, until stillWriting says the writer is gone and the file is drained, or ctx
// ends (the client went away). A file that does not exist yet is an empty log (the container has not written).
func streamLog(ctx context.Context, out io.Writer, path string, tailLines *int64, follow bool, stillWriting func() bool) error {
	f, err := waitOpen(ctx, path, follow, stillWriting)
	if f == nil || err != nil {
		return err
	}
	defer f.Close()
	if tailLines != nil {
		start, err := tailStart(f, *tailLines)
		if err != nil {
			return err
		}
		if _, err := f.Seek(start, io.SeekStart); err != nil {
			return err
		}
	}
	buf := make([]byte, 32*1024)
	for {
		if _, err := io.CopyBuffer(out, f, buf); err != nil {
			return err
		}
		if !follow {
			return nil
		}
		if !stillWriting() {
			// The writer stopped before this check: whatever it wrote is in the file now.
			_, err := io.CopyBuffer(out, f, buf)
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(pollInterval):
		}
	}
}

// waitOpen opens the log; when following a log the container has not created yet, it waits for it.
func waitOpen(ctx context.Context, path string, follow bool, stillWriting func() bool) (*os.File, error) {
	for {
		f, err := os.Open(path)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		if !follow || !stillWriting() {
			return nil, nil
		}
		select {
		case <-ctx.Done():
			return nil, nil
		case <-time.After(pollInterval):
		}
	}
}

// tailStart returns the offset of the first of the last n lines of f. A last line without its newline counts as a
// line, as in the kubelet's findTailLineStartIndex.
func tailStart(f *os.File, n int64) (int64, error) {
	info, err := f.Stat()
	if err != nil {
		return 0, err
	}
	size := info.Size()
	if n == 0 {
		return size, nil
	}
	const block = 32 * 1024
	buf := make([]byte, block)
	pos := size
	newlines := int64(0)
	for pos > 0 {
		chunk := int64(block)
		if pos < chunk {
			chunk = pos
		}
		pos -= chunk
		if _, err := f.ReadAt(buf[:chunk], pos); err != nil && !errors.Is(err, io.EOF) {
			return 0, err
		}
		for i := chunk - 1; i >= 0; i-- {
			// A trailing newline ends the last line rather than starting an empty one.
			if buf[i] != '\n' || pos+i == size-1 {
				continue
			}
			newlines++
			if newlines == n {
				return pos + i + 1, nil
			}
		}
	}
	return 0, nil
}

// flushWriter sends each write to the client at once, as the kubelet's flushwriter does for followed logs.
type flushWriter struct {
	w io.Writer
	f *http.ResponseController
}

func (fw *flushWriter) Write(p []byte) (int, error) {
	n, err := fw.w.Write(p)
	if err == nil {
		err = fw.f.Flush()
	}
	return n, err
}

var errLimitReached = errors.New("limitBytes reached")

// limitWriter stops the stream after limitBytes bytes, as the kubelet's LimitWriter does.
type limitWriter struct {
	w    io.Writer
	left int64
}

func (lw *limitWriter) Write(p []byte) (int, error) {
	if lw.left <= 0 {
		return 0, errLimitReached
	}
	cut := false
	if int64(len(p)) > lw.left {
		p, cut = p[:lw.left], true
	}
	n, err := lw.w.Write(p)
	lw.left -= int64(n)
	if err == nil && cut {
		err = errLimitReached
	}
	return n, err
}
