package policy

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/fsnotify/fsnotify"
)

// DefaultDebounce is how long Watch waits after the last file event before
// reloading, so an editor's write-rename-chmod burst causes one reload.
const DefaultDebounce = 100 * time.Millisecond

// Watch loads dir, passes the Set to apply, then reloads on every change to
// the directory (fsnotify) until ctx is done. A load that fails is logged
// with every file:line:field error and not applied: the last good Set stays
// in force (at start, that is no Set at all, and apply is not called until
// the directory is fixed). apply is called from Watch's goroutine, never
// concurrently. Watch returns nil when ctx ends, or an error when dir cannot
// be watched (for instance, it does not exist).
func Watch(ctx context.Context, dir string, logger *slog.Logger, apply func(*Set)) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("policy: watch %s: %w", dir, err)
	}
	defer w.Close()
	if err := w.Add(dir); err != nil {
		return fmt.Errorf("policy: watch %s: %w", dir, err)
	}
	reload := func(initial bool) {
		set, err := Load(dir)
		if err != nil {
			keep := "keeping the last good policy set"
			if initial {
				keep = "serving without policies until the directory is fixed"
			}
			logger.Error("policy: invalid policy files, "+keep, "dir", dir, "errors", err.Error())
			return
		}
		logger.Info("policy: loaded", "dir", dir, "files", len(set.Files), "policies", set.Summary())
		apply(set)
	}
	reload(true)

	timer := time.NewTimer(0)
	if !timer.Stop() {
		<-timer.C
	}
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return nil
			}
			if ev.Op == fsnotify.Chmod {
				continue
			}
			timer.Reset(DefaultDebounce)
		case err, ok := <-w.Errors:
			if !ok {
				return nil
			}
			logger.Warn("policy: watch error; reloading", "dir", dir, "error", err)
			timer.Reset(DefaultDebounce)
		case <-timer.C:
			reload(false)
		}
	}
}
