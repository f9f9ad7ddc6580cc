// test_report.c: the JSON-lines reader and `mlm report`: page content, charts, escaping, edge cases, errors.
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mlm/common.h"
#include "mlm/json.h"
#include "mlm/report.h"
#include "test_util.h"

// ---- JSON reader.

static int parse(const char *s, JsonObject *o, char *err) { return json_parse_object(s, strlen(s), o, err, 200); }

static void test_json(void) {
    JsonObject o;
    char err[200];
    CHECK(parse("{\"kind\":\"train\",\"step\":120,\"loss\":3.21e0,\"x\":-0.5,\"ok\":true,\"n\":null}", &o, err) == 0,
          "%s", err);
    CHECK(o.n == 6, "%d fields", o.n);
    CHECK(!strcmp(json_str(&o, "kind"), "train"), "kind");
    CHECK(json_num(&o, "step", -1) == 120 && json_num(&o, "loss", -1) == 3.21 && json_num(&o, "x", 0) == -0.5,
          "numbers");
    CHECK(json_num(&o, "ok", -1) == 1 && json_get(&o, "n")->type == JSON_NULL, "true/null");
    CHECK(json_num(&o, "absent", 7) == 7 && json_num(&o, "kind", 7) == 7 && !json_str(&o, "step"), "lookups");
    json_free(&o);

    // Escapes, including \u with a surrogate pair; nested values are skipped, a repeated key keeps the last.
    CHECK(parse(" {\"s\":\"a\\\"b\\\\c\\n\\u00e9\\ud83d\\ude00\", \"nest\":{\"a\":[1,\"]}\"]}, \"s2\":\"x\",\"s2\":\"y\"} ",
                &o, err) == 0, "%s", err);
    CHECK(o.n == 3, "%d fields", o.n);
    CHECK(!strcmp(json_str(&o, "s"), "a\"b\\c\n\xc3\xa9\xf0\x9f\x98\x80"), "unescaped: %s", json_str(&o, "s"));
    CHECK(json_get(&o, "nest")->type == JSON_OTHER && !strcmp(json_str(&o, "s2"), "y"), "nested / repeat");
    json_free(&o);

    // What C's printf writes for non-finite values, and JavaScript's spellings.
    CHECK(parse("{\"a\":nan,\"b\":-nan,\"c\":inf,\"d\":-inf,\"e\":NaN,\"f\":-Infinity}", &o, err) == 0, "%s", err);
    CHECK(isnan(json_num(&o, "a", 0)) && isnan(json_num(&o, "b", 0)) && isnan(json_num(&o, "e", 0)), "nan");
    CHECK(json_num(&o, "c", 0) == INFINITY && json_num(&o, "d", 0) == -INFINITY && json_num(&o, "f", 0) == -INFINITY,
          "inf");
    json_free(&o);
    CHECK(parse("{}", &o, err) == 0 && o.n == 0, "empty object");
    json_free(&o);

    const char *bad[] = {"", "{", "{\"step\":12", "{\"step\":1,", "{\"kind\":\"tr", "{\"a\":1} x", "[1]",
                         "{\"a\":01x}", "{\"a\":.5}", "{\"a\":1.}", "{\"a\":\"\\q\"}", "{\"a\":\"\\ud800\"}",
                         "{a:1}", "{\"a\":tru}", "{\"a\":[1,2}"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        CHECK(parse(bad[i], &o, err) != 0 && err[0] && o.n == 0 && !o.buf, "accepted %s", bad[i]);
    }
}

static void test_downsample(void) {
    enum { N = 5000 };
    static double y[N];
    static size_t keep[REPORT_MAX_DRAWN];
    for (int i = 0; i < N; i++) y[i] = sin(i * 0.01);
    y[1234] = 50;    // a spike must survive
    y[4321] = -50;
    size_t k = report_downsample(y, N, REPORT_MAX_DRAWN, keep);
    CHECK(k <= REPORT_MAX_DRAWN && k >= REPORT_MAX_DRAWN / 2, "kept %zu", k);
    int spike = 0, dip = 0, sorted = 1;
    for (size_t i = 0; i < k; i++) {
        spike |= keep[i] == 1234;
        dip |= keep[i] == 4321;
        if (i && keep[i] <= keep[i - 1]) sorted = 0;
    }
    CHECK(spike && dip && sorted, "spike %d dip %d sorted %d", spike, dip, sorted);
    CHECK(report_downsample(y, 7, REPORT_MAX_DRAWN, keep) == 7 && keep[6] == 6, "short series kept whole");
}

// ---- Run directories.

static char tmp_root[256];

static void make_tmp_root(void) {
    const char *t = getenv("TMPDIR");
    snprintf(tmp_root, sizeof(tmp_root), "%s/mlm_report_XXXXXX", t && *t ? t : "/tmp");
    if (!mkdtemp(tmp_root)) { perror("mkdtemp"); exit(1); }
}

static void rm_rf(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    char path[600];
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        struct stat st;
        if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) rm_rf(path);
        else unlink(path);
    }
    closedir(d);
    rmdir(dir);
}

static void write_text(const char *dir, const char *name, const char *text) {
    char path[600];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    if (!f) { perror(path); exit(1); }
    fputs(text, f);
    fclose(f);
}

static char *make_run(const char *name) {
    char *dir = mlm_malloc(512, "path");
    snprintf(dir, 512, "%s/%s", tmp_root, name);
    mkdir(dir, 0755);
    return dir;
}

// Synthetic metrics: n_train train lines every 10 steps (loss falling with noise), a valid line every
// valid_every train lines. The best valid accuracy is 0.4321 at step 3500; `nan_at` >= 0 writes that train
// line's loss as nan; time_reset > 0 restarts time_s there (as a resumed run does).
static void write_metrics(const char *dir, int n_train, int valid_every, int nan_at, int time_reset, int torn) {
    char path[600];
    snprintf(path, sizeof(path), "%s/metrics.jsonl", dir);
    FILE *f = fopen(path, "w");
    if (!f) { perror(path); exit(1); }
    double t0 = 0;
    for (int i = 0; i < n_train; i++) {
        long step = 10L * (i + 1);
        if (i == time_reset) t0 = 10.0 * i;
        double t = 10.0 * (i + 1) - t0, loss = 1.5 + 2.7 * exp(-i / 120.0) + 0.05 * sin(i * 1.7);
        fprintf(f, "{\"kind\":\"train\",\"step\":%ld,\"epoch\":%d,\"tokens\":%ld,", step, i / 50, step * 2048);
        if (i == nan_at) fprintf(f, "\"loss\":nan,");
        else fprintf(f, "\"loss\":%.9g,", loss);
        fprintf(f, "\"accuracy\":%.6g,\"lr\":%.6g,\"grad_norm\":1.5,\"tokens_per_s\":%.6g,\"time_s\":%.3f,"
                "\"future_key\":\"ignored\"}\n", 0.5 - 0.4 * exp(-i / 150.0), 1e-3 * fmin(1, (i + 1) / 100.0),
                10000 + 300 * sin(i * 0.3), t);
        if (valid_every && (i + 1) % valid_every == 0) {
            double acc = step == 3500 ? 0.4321 : 0.40 * (1 - exp(-i / 100.0));
            fprintf(f, "{\"kind\":\"valid\",\"step\":%ld,\"epoch\":%d,\"tokens\":%ld,\"loss\":%.9g,\"accuracy\":%.9g,"
                    "\"time_s\":%.3f}\n", step, i / 50, step * 2048, loss + 0.1, acc, t + 1);
        }
    }
    if (torn) fputs("{\"kind\":\"train\",\"step\":99999,\"loss\":1.2", f);
    fclose(f);
}

static char *read_report(const char *path) {
    char *s = mlm_read_file(path, NULL);
    CHECK(s != NULL, "no report at %s", path);
    return s ? s : mlm_strdup("");
}

static int count(const char *hay, const char *needle) {
    int n = 0;
    for (const char *p = strstr(hay, needle); p; p = strstr(p + 1, needle)) n++;
    return n;
}

// Number of "x,y" pairs in the polyline with data-series="id" (-1 when absent).
static int polyline_points(const char *html, const char *id) {
    char pat[80];
    snprintf(pat, sizeof(pat), "data-series=\"%s\"", id);
    const char *p = strstr(html, pat);
    if (!p) return -1;
    const char *pts = strstr(p, "points=\"");
    if (!pts) return -1;
    pts += 8;
    int n = 0;
    for (const char *q = pts; *q && *q != '"'; q++) n += *q == ',';
    return n;
}

// The <table class="summary"> part of the page.
static char *summary_of(const char *html) {
    const char *a = strstr(html, "<table class=\"summary\">"), *b = a ? strstr(a, "</table>") : NULL;
    if (!a || !b) return mlm_strdup("");
    size_t n = (size_t)(b - a);
    char *s = mlm_malloc(n + 1, "summary");
    memcpy(s, a, n);
    s[n] = '\0';
    return s;
}

static int has_tmp_files(const char *dir) {
    DIR *d = opendir(dir);
    int found = 0;
    struct dirent *e;
    while (d && (e = readdir(d))) found |= strstr(e->d_name, ".tmp.") != NULL;
    if (d) closedir(d);
    return found;
}

static void common_checks(const char *html, const char *what) {
    CHECK(!strncmp(html, "<!DOCTYPE html>", 15), "%s: does not start with <!DOCTYPE html>", what);
    CHECK(strstr(html, "</html>") != NULL, "%s: no </html>", what);
    CHECK(!strstr(html, "http://") && !strstr(html, "https://"), "%s: refers to the network", what);
    CHECK(!strstr(html, "<script") && !strstr(html, "<link"), "%s: scripts or linked resources", what);
    CHECK(count(html, "<svg") == count(html, "</svg>"), "%s: unbalanced <svg>", what);
}

static void test_typical_run(void) {
    char err[512];
    char *dir = make_run("typical");
    write_metrics(dir, 500, 50, 100, 0, 1);
    write_text(dir, "config.conf", "# resolved configuration\n[train]\nbatch_size = 64\nname = <x&y>\n");
    write_text(dir, "samples.txt", "epoch 3 step 1473\nWe are a<ccounted & poor\nsecond line\n");
    int rc = report_write(dir, NULL, err, sizeof(err));
    CHECK(rc == 0, "report_write failed: %s", err);
    char path[600];
    snprintf(path, sizeof(path), "%s/report.html", dir);
    char *html = read_report(path);
    common_checks(html, "typical");
    CHECK(count(html, "<svg") == 4, "%d charts, want 4", count(html, "<svg"));
    CHECK(polyline_points(html, "loss-train") == 499, "loss-train %d points (500 minus one nan)",
          polyline_points(html, "loss-train"));
    CHECK(polyline_points(html, "loss-valid") == 10, "loss-valid %d", polyline_points(html, "loss-valid"));
    CHECK(polyline_points(html, "accuracy-train") == 500, "accuracy-train %d", polyline_points(html, "accuracy-train"));
    CHECK(polyline_points(html, "accuracy-valid") == 10, "accuracy-valid %d", polyline_points(html, "accuracy-valid"));
    CHECK(polyline_points(html, "lr-train") == 500, "lr-train %d", polyline_points(html, "lr-train"));
    CHECK(polyline_points(html, "throughput-train") == 500, "throughput %d", polyline_points(html, "throughput-train"));
    char *summary = summary_of(html);
    CHECK(strstr(summary, "<b>0.4321</b>") && strstr(summary, "at step <b>3,500</b>"),
          "best valid accuracy 0.4321 at step 3,500 not in the table");
    CHECK(strstr(summary, "10,240,000") != NULL, "total tokens (5000 steps x 2048) not in the table");
    CHECK(strstr(summary, "Wall time") && strstr(summary, "(5001.0 s)"), "wall time not in the table");
    free(summary);
    CHECK(strstr(html, "1 non-finite train value") != NULL, "no note about the nan");
    CHECK(strstr(html, "incomplete") != NULL, "no note about the torn line");
    CHECK(strstr(html, "We are a&lt;ccounted &amp; poor") && !strstr(html, "a<ccounted"), "samples not escaped");
    CHECK(strstr(html, "name = &lt;x&amp;y&gt;") != NULL, "config not escaped");
    CHECK(strstr(html, "epoch 4 (step 1473)") != NULL, "samples header not shown as a caption");
    CHECK(strstr(html, "(\xc3\x97" "10\xe2\x81\xbb\xc2\xb3)") != NULL, "learning-rate axis lacks its x10^-3 factor");
    CHECK(!strstr(html, "no metrics yet"), "typical run says no metrics");
    CHECK(!has_tmp_files(dir), "temporary file left behind");

    // Rewriting replaces the file in place.
    CHECK(report_write(dir, NULL, err, sizeof(err)) == 0, "second write: %s", err);
    free(html);
    free(dir);
}

// Thousands of points are drawn downsampled while the summary still sees every record; time_s restarting
// (a resumed run) adds up.
static void test_long_run(void) {
    char err[512], out[600];
    char *dir = make_run("long");
    write_metrics(dir, 6000, 50, -1, 3000, 0);
    snprintf(out, sizeof(out), "%s/elsewhere.html", tmp_root);
    CHECK(report_write(dir, out, err, sizeof(err)) == 0, "report_write failed: %s", err);
    char *html = read_report(out);
    common_checks(html, "long");
    int n = polyline_points(html, "loss-train");
    CHECK(n <= REPORT_MAX_DRAWN && n >= REPORT_MAX_DRAWN / 2, "loss-train drawn with %d points", n);
    CHECK(polyline_points(html, "loss-valid") == 120, "loss-valid %d", polyline_points(html, "loss-valid"));
    char *summary = summary_of(html);
    CHECK(strstr(summary, "<b>0.4321</b>") && strstr(summary, "<b>3,500</b>"), "best valid accuracy changed");
    CHECK(strstr(summary, "(60002.0 s)") != NULL, "wall time over two segments is not 60002 s");
    CHECK(strstr(summary, "6,000 train, 120 valid") != NULL, "record counts");
    free(summary);
    CHECK(strstr(html, "No samples.txt") && strstr(html, "No config.conf"), "missing files not noted");
    snprintf(out, sizeof(out), "%s/report.html", dir);
    CHECK(access(out, F_OK) != 0, "out_path given but report.html written in the run directory");
    free(html);
    free(dir);
}

static void test_edge_cases(void) {
    char err[512], path[600];
    // Empty metrics: a page without charts.
    char *dir = make_run("empty");
    write_text(dir, "metrics.jsonl", "");
    CHECK(report_write(dir, NULL, err, sizeof(err)) == 0, "empty: %s", err);
    snprintf(path, sizeof(path), "%s/report.html", dir);
    char *html = read_report(path);
    common_checks(html, "empty");
    CHECK(strstr(html, "no metrics yet") && count(html, "<svg") == 0, "empty metrics should say no metrics yet");
    free(html);
    free(dir);

    // A single train and valid point each; the learning-rate and throughput charts still render.
    dir = make_run("single");
    write_text(dir, "metrics.jsonl", "{\"kind\":\"train\",\"step\":10,\"epoch\":0,\"tokens\":20480,\"loss\":4.1,"
               "\"accuracy\":0.05,\"lr\":0.0001,\"grad_norm\":2,\"tokens_per_s\":9000,\"time_s\":1.5}\n"
               "{\"kind\":\"valid\",\"step\":10,\"epoch\":0,\"tokens\":20480,\"loss\":4.0,\"accuracy\":0.06,"
               "\"time_s\":2}\n");
    CHECK(report_write(dir, NULL, err, sizeof(err)) == 0, "single: %s", err);
    snprintf(path, sizeof(path), "%s/report.html", dir);
    html = read_report(path);
    common_checks(html, "single");
    CHECK(count(html, "<svg") == 4, "single: %d charts", count(html, "<svg"));
    CHECK(polyline_points(html, "loss-train") == 1 && polyline_points(html, "loss-valid") == 1 &&
          polyline_points(html, "lr-train") == 1, "single: one point per polyline");
    CHECK(count(html, "<circle") == 6, "single: %d markers, want 6", count(html, "<circle"));
    CHECK(!strstr(html, "nan") && !strstr(html, "inf\""), "single: non-finite coordinates");
    free(html);
    free(dir);

    // A damaged line in the middle is skipped and noted; the lines around it still count.
    dir = make_run("damaged");
    write_text(dir, "metrics.jsonl", "{\"kind\":\"train\",\"step\":10,\"loss\":4,\"accuracy\":0.1}\r\n"
               "{\"kind\":\"train\",\"step\":20,\"lo\x01ss\":3}\n\n"
               "{\"kind\":\"train\",\"step\":30,\"loss\":3,\"accuracy\":0.2}\n");
    CHECK(report_write(dir, NULL, err, sizeof(err)) == 0, "damaged: %s", err);
    snprintf(path, sizeof(path), "%s/report.html", dir);
    html = read_report(path);
    CHECK(strstr(html, "1 malformed line of metrics.jsonl skipped (the first is line 2)") != NULL, "damaged: no note");
    CHECK(polyline_points(html, "loss-train") == 2 && !strstr(html, "incomplete"), "damaged: records around it");
    free(html);
    free(dir);

    // Only a torn line (the run died writing its first record): still a page, no charts.
    dir = make_run("torn_only");
    write_text(dir, "metrics.jsonl", "{\"kind\":\"train\",\"st");
    CHECK(report_write(dir, NULL, err, sizeof(err)) == 0, "torn only: %s", err);
    free(dir);
}

static void test_errors(void) {
    char err[512], path[600];
    snprintf(path, sizeof(path), "%s/does_not_exist", tmp_root);
    CHECK(report_write(path, NULL, err, sizeof(err)) != 0, "missing directory accepted");
    CHECK(strstr(err, "does_not_exist") != NULL, "error does not name the directory: %s", err);
    char *dir = make_run("no_metrics");
    err[0] = '\0';
    CHECK(report_write(dir, NULL, err, sizeof(err)) != 0, "directory without metrics.jsonl accepted");
    CHECK(strstr(err, "metrics.jsonl") && strstr(err, "missing"), "error does not say metrics.jsonl is missing: %s",
          err);
    snprintf(path, sizeof(path), "%s/report.html", dir);
    CHECK(access(path, F_OK) != 0, "a report was written despite the error");
    write_text(dir, "metrics.jsonl", "");
    snprintf(path, sizeof(path), "%s/no/such/dir/r.html", tmp_root);
    CHECK(report_write(dir, path, err, sizeof(err)) != 0 && strstr(err, "cannot write"), "unwritable out: %s", err);
    snprintf(path, sizeof(path), "%s/metrics.jsonl", dir);
    CHECK(report_write(path, NULL, err, sizeof(err)) != 0 && strstr(err, "not a directory"), "file as dir: %s", err);
    free(dir);
}

int main(void) {
    make_tmp_root();
    test_json();
    test_downsample();
    test_typical_run();
    test_long_run();
    test_edge_cases();
    test_errors();
    rm_rf(tmp_root);
    return test_finish("test_report");
}
