// Package cli holds the flag and logging plumbing both meshlet binaries
// share.
package cli

import (
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
)

// EnvOr returns the environment variable key, or def when it is unset or
// empty.
func EnvOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// LogLevel registers -log-level on fs and returns a function that builds the
// text logger writing to w at the chosen level, or an error naming the bad
// value.
func LogLevel(fs *flag.FlagSet, w io.Writer) func() (*slog.Logger, error) {
	level := fs.String("log-level", "info", "debug, info, warn or error")
	return func() (*slog.Logger, error) {
		var l slog.Level
		if err := l.UnmarshalText([]byte(*level)); err != nil {
			return nil, fmt.Errorf("-log-level: %w", err)
		}
		return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: l})), nil
	}
}
