// report.h: `mlm report`: a self-contained HTML page (SVG charts, summary, config, samples) of a run directory.
#ifndef MLM_REPORT_H
#define MLM_REPORT_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// Points per series drawn at most; longer series are reduced to the min and max of equal index buckets.
#define REPORT_MAX_DRAWN 1000

// Write the report of run_dir (its metrics.jsonl, config.conf and samples.txt) to out_path, or to
// run_dir/report.html when out_path is NULL. The file is replaced atomically (temporary file + rename).
// Returns 0 on success; otherwise nonzero with a message in err saying what is missing and what to do.
// Malformed metrics lines (a torn last line of a killed run) are skipped with a warning on stderr.
int report_write(const char *run_dir, const char *out_path, char *err, size_t errlen);

// The downsampling used for drawing: indices into y[0..n) to keep, in increasing order, written to keep
// (room for max_points); returns their count. n <= max_points keeps all; otherwise max_points / 2 buckets
// of consecutive indices each keep their minimum and maximum, so spikes survive.
size_t report_downsample(const double *y, size_t n, size_t max_points, size_t *keep);

#ifdef __cplusplus
}
#endif

#endif
