// run_dir.c: the run directory of `mlm train`: its name, the lock that keeps it to one process, the checkpoints a
// killed writer left unfinished, metrics.jsonl (trimmed to the checkpoint on resume) and config.conf.
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "mlm/common.h"
#include "mlm/json.h"
#include "run.h"

// mkdir -p: `--out runs/x` in a fresh checkout creates runs/ too.
static void make_dir(const char *path) {
    char parent[1024];
    snprintf(parent, sizeof(parent), "%s", path);
    char *slash = strrchr(parent, '/');
    if (slash && slash != parent) {
        *slash = '\0';
        if (access(parent, F_OK) != 0) make_dir(parent);
    }
    if (mkdir(path, 0755) != 0 && errno != EEXIST)
        mlm_fatal(MLM_EXIT_FAILURE, "cannot create directory %s: %s", path, strerror(errno));
}

// On resume, metrics logged after the checkpoint (the run went on before it died) are dropped so that the
// resumed run's lines follow the checkpoint without duplicates; so are lines that do not parse. A valid line
// stays when the checkpoint records its validation as done: at or before last_valid_step, or (version-1
// checkpoints, which lack it) in a completed epoch.
static int metrics_line_before(const char *line, const TrainState *st) {
    JsonObject o;
    char err[128];
    if (json_parse_object(line, strlen(line), &o, err, sizeof(err))) return 0;
    const char *kind = json_str(&o, "kind");
    double step = json_num(&o, "step", 1e300), epoch = json_num(&o, "epoch", 1e300);
    int keep = kind && !strcmp(kind, "valid")
                   ? step <= (double)st->last_valid_step || (epoch < (double)st->valid_epochs && step <= (double)st->step)
                   : step <= (double)st->step;
    json_free(&o);
    return keep;
}

static void trim_metrics(const char *path, const TrainState *st) {
    size_t len;
    char *text = mlm_read_file(path, &len);
    if (!text) return;
    char tmp[1200];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) mlm_fatal(MLM_EXIT_FAILURE, "cannot write %s: %s", tmp, strerror(errno));
    for (char *line = text; *line;) {
        char *nl = strchr(line, '\n');
        if (!nl) break;  // a torn last line (killed mid-write) is dropped
        *nl = '\0';
        if (metrics_line_before(line, st)) fprintf(f, "%s\n", line);
        line = nl + 1;
    }
    free(text);
    if (fclose(f) != 0 || rename(tmp, path) != 0)
        mlm_fatal(MLM_EXIT_FAILURE, "cannot rewrite %s: %s", path, strerror(errno));
}

// RUN_DIR: --out, or runs/<config name>-<timestamp>; created if needed.
void run_dir_choose(Run *r) {
    if (r->opt.out_dir) {
        snprintf(r->run_dir, sizeof(r->run_dir), "%s", r->opt.out_dir);
    } else {
        const char *base = r->opt.config_path ? strrchr(r->opt.config_path, '/') : NULL;
        base = base ? base + 1 : r->opt.config_path ? r->opt.config_path : "default";
        char name[128];
        snprintf(name, sizeof(name), "%s", base);
        char *dot = strrchr(name, '.');
        if (dot) *dot = '\0';
        char stamp[32];
        time_t now = time(NULL);
        strftime(stamp, sizeof(stamp), "%Y%m%d-%H%M%S", localtime(&now));
        make_dir("runs");
        snprintf(r->run_dir, sizeof(r->run_dir), "runs/%s-%s", name, stamp);
    }
    make_dir(r->run_dir);
}

// The lock is released (and its file deleted) at exit, error exits included; a killed process leaves the
// file behind, and the next run takes it over.
static RunLock *held_lock;
static void release_lock_at_exit(void) {
    if (held_lock) run_lock_release(held_lock);
}

// A checkpoint is written as NAME.tmp and renamed; a writer killed in between (kill -9, power loss) leaves the
// .tmp behind. Once this process holds the lock nobody else writes here, so any .tmp is such a leftover: an
// incomplete file that no loader reads, removed so that it neither fills the disk nor looks like work.
static void remove_stale_checkpoint_temporaries(const char *run_dir) {
    char dir[1100];
    snprintf(dir, sizeof(dir), "%s/checkpoints", run_dir);
    DIR *d = opendir(dir);
    if (!d) return;  // no checkpoints yet
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t n = strlen(e->d_name);
        static const char suffix[] = ".safetensors.tmp";
        if (n <= sizeof(suffix) - 1 || strcmp(e->d_name + n - (sizeof(suffix) - 1), suffix) != 0) continue;
        char path[1400];
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        if (unlink(path) == 0) mlm_warn("removed %s, an unfinished checkpoint of a run that was killed while writing it", path);
    }
    closedir(d);
}

void run_dir_lock(Run *r) {
    char err[1400];
    if (run_lock_acquire(r->run_dir, &r->lock, err, sizeof(err))) mlm_fatal(MLM_EXIT_USAGE, "%s", err);
    held_lock = &r->lock;
    atexit(release_lock_at_exit);
    remove_stale_checkpoint_temporaries(r->run_dir);
}

void run_dir_unlock(Run *r) {
    run_lock_release(&r->lock);
    held_lock = NULL;
}

// metrics.jsonl (trimmed to the checkpoint on resume) and config.conf. A fresh start is refused in a directory
// with checkpoints (that run can be continued), and allowed in one without: a run stopped before its first
// checkpoint has nothing to continue, and its metrics are replaced.
void run_dir_open_files(Run *r, int resuming) {
    char path[1100], ckpt[1200];
    snprintf(path, sizeof(path), "%s/metrics.jsonl", r->run_dir);
    struct stat st;
    if (resuming) {
        trim_metrics(path, &r->st);
    } else if (ckpt_find_latest(r->run_dir, ckpt, sizeof(ckpt)) == 0) {
        mlm_fatal(MLM_EXIT_USAGE, "%s already holds a run with checkpoints (%s); continue it with --resume %s or "
                  "choose another --out directory", r->run_dir, ckpt, r->run_dir);
    } else if (stat(path, &st) == 0 && st.st_size > 0) {
        mlm_warn("%s holds a run that stopped before its first checkpoint; starting afresh (its metrics.jsonl is "
                 "replaced)", r->run_dir);
    }
    r->metrics = fopen(path, resuming ? "a" : "w");
    if (!r->metrics) mlm_fatal(MLM_EXIT_FAILURE, "cannot write %s: %s", path, strerror(errno));
    snprintf(path, sizeof(path), "%s/config.conf", r->run_dir);
    FILE *f = fopen(path, "w");
    if (!f) mlm_fatal(MLM_EXIT_FAILURE, "cannot write %s: %s", path, strerror(errno));
    fprintf(f, "# resolved configuration of this run (mlm %s)\n", MLM_VERSION);
    config_write(f, &r->cfg);
    fclose(f);
}

// One line of metrics.jsonl (lr < 0: a validation line, without lr, norm and speed).
void log_metrics(Run *r, const char *kind, long epoch, double loss, double acc, double lr, double gnorm,
                 double tok_per_s) {
    if (!r->metrics) return;  // ranks other than 0 of a data-parallel job
    // A validation split without targets has no loss or accuracy: null (mlm report skips it).
    char loss_s[32] = "null", acc_s[32] = "null";
    if (isfinite(loss)) snprintf(loss_s, sizeof(loss_s), "%.9g", loss);
    if (isfinite(acc)) snprintf(acc_s, sizeof(acc_s), "%.9g", acc);
    fprintf(r->metrics, "{\"kind\":\"%s\",\"step\":%ld,\"epoch\":%ld,\"tokens\":%.0f,\"loss\":%s,\"accuracy\":%s",
            kind, r->step, epoch, r->st.tokens, loss_s, acc_s);
    if (lr >= 0) fprintf(r->metrics, ",\"lr\":%.6g,\"grad_norm\":%.6g,\"tokens_per_s\":%.6g", lr, gnorm, tok_per_s);
    // time_s: training wall time of the whole run, across checkpoints and resumes.
    fprintf(r->metrics, ",\"time_s\":%.3f}\n", r->st.elapsed_s + (mlm_now() - r->t_start));
    fflush(r->metrics);
}
