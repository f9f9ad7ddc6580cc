// report.c: `mlm report`: reads a run directory and writes one self-contained HTML page with inline SVG charts.
//
// The page must open anywhere, offline and years later: no scripts, no fonts or styles from the network,
// nothing but this file. Charts are drawn here, in C, as SVG polylines on "nice" axes.
#include "mlm/report.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "mlm/common.h"
#include "mlm/json.h"

// ---------------------------------------------------------------------------------------------------------
// Metrics: one series per curve, plus the summary numbers (always from every record, never the drawn subset).

typedef struct {
    double *x, *y;
    size_t n, cap;
    long nonfinite;  // values present but NaN/inf: not drawn, counted for the page's note
} Series;

typedef struct {
    Series train_loss, valid_loss, train_acc, valid_acc, lr, tps;
    long n_train, n_valid, bad_lines, first_bad_line;
    int torn_last;                      // the last line did not parse: a run killed mid-write
    double last_step, last_epoch;
    double last_train_loss, last_train_acc, last_train_step;
    double last_valid_loss, last_valid_acc, last_valid_step;
    double best_acc, best_acc_step;     // best valid accuracy
    double best_loss, best_loss_step;   // best valid loss
    double last_lr, tps_sum;
    long tps_count;
    double tokens;                      // the largest token count logged
    double wall_s;                      // time_s summed over segments (it restarts when a run is resumed)
    double seg_time;                    // the current segment's latest time_s
} Metrics;

static void series_add(Series *s, double x, double y) {
    if (!isfinite(y) || !isfinite(x)) { s->nonfinite++; return; }
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 256;
        double *nx = realloc(s->x, s->cap * sizeof(double)), *ny = nx ? realloc(s->y, s->cap * sizeof(double)) : NULL;
        if (!nx || !ny) mlm_fatal(MLM_EXIT_FAILURE, "out of host memory reading metrics (%zu points)", s->n);
        s->x = nx;
        s->y = ny;
    }
    s->x[s->n] = x;
    s->y[s->n] = y;
    s->n++;
}

static void series_free(Series *s) {
    free(s->x);
    free(s->y);
    memset(s, 0, sizeof(*s));
}

typedef struct { double x, y; } Point;

static int cmp_point_x(const void *a, const void *b) {
    double xa = ((const Point *)a)->x, xb = ((const Point *)b)->x;
    return (xa > xb) - (xa < xb);
}

// Lines of a run are in step order; a hand-edited or concatenated file may not be, and a polyline
// drawn out of order zigzags, so sort when needed.
static void series_sort(Series *s) {
    size_t i = 1;
    while (i < s->n && s->x[i - 1] <= s->x[i]) i++;
    if (i >= s->n) return;
    Point *p = mlm_malloc(s->n * sizeof(Point), "sorting a metric series");
    for (size_t k = 0; k < s->n; k++) p[k] = (Point){s->x[k], s->y[k]};
    qsort(p, s->n, sizeof(Point), cmp_point_x);
    for (size_t k = 0; k < s->n; k++) { s->x[k] = p[k].x; s->y[k] = p[k].y; }
    free(p);
}

// Adds the value of key (when the record has it) to the series.
static void add_field(Series *s, const JsonObject *o, const char *key, double step) {
    const JsonField *f = json_get(o, key);
    if (!f) return;
    series_add(s, step, f->type == JSON_NUMBER ? f->num : NAN);
}

static void account_record(Metrics *m, const JsonObject *o, int train, double step) {
    double loss = json_num(o, "loss", NAN), acc = json_num(o, "accuracy", NAN);
    double t = json_num(o, "time_s", NAN), tokens = json_num(o, "tokens", NAN);
    m->last_step = step;
    m->last_epoch = json_num(o, "epoch", m->last_epoch);
    if (isfinite(tokens) && (isnan(m->tokens) || tokens > m->tokens)) m->tokens = tokens;
    if (isfinite(t)) {
        if (t < m->seg_time) m->wall_s += m->seg_time;  // time_s went back: a new segment began
        m->seg_time = t;
    }
    if (train) {
        m->n_train++;
        m->last_train_loss = loss;
        m->last_train_acc = acc;
        m->last_train_step = step;
        double lr = json_num(o, "lr", NAN), tps = json_num(o, "tokens_per_s", NAN);
        if (json_get(o, "lr")) m->last_lr = lr;
        if (isfinite(tps)) { m->tps_sum += tps; m->tps_count++; }
        return;
    }
    m->n_valid++;
    m->last_valid_loss = loss;
    m->last_valid_acc = acc;
    m->last_valid_step = step;
    if (isfinite(acc) && (isnan(m->best_acc) || acc > m->best_acc)) { m->best_acc = acc; m->best_acc_step = step; }
    if (isfinite(loss) && (isnan(m->best_loss) || loss < m->best_loss)) { m->best_loss = loss; m->best_loss_step = step; }
}

// One line of metrics.jsonl. Returns 0 if used or ignored (another kind), -1 if it does not parse.
static int read_record(Metrics *m, const char *line, size_t len, char *err, size_t errlen) {
    JsonObject o;
    if (json_parse_object(line, len, &o, err, errlen)) return -1;
    const char *kind = json_str(&o, "kind");
    double step = json_num(&o, "step", NAN);
    int train = kind && !strcmp(kind, "train"), valid = kind && !strcmp(kind, "valid");
    if ((train || valid) && !isfinite(step)) {
        snprintf(err, errlen, "no finite \"step\"");
        json_free(&o);
        return -1;
    }
    if (train || valid) {
        account_record(m, &o, train, step);
        add_field(train ? &m->train_loss : &m->valid_loss, &o, "loss", step);
        add_field(train ? &m->train_acc : &m->valid_acc, &o, "accuracy", step);
        if (train) add_field(&m->lr, &o, "lr", step);
        if (train) add_field(&m->tps, &o, "tokens_per_s", step);
    }
    json_free(&o);
    return 0;
}

static void metrics_init(Metrics *m) {
    memset(m, 0, sizeof(*m));
    m->last_step = m->last_epoch = NAN;
    m->last_train_loss = m->last_train_acc = m->last_train_step = NAN;
    m->last_valid_loss = m->last_valid_acc = m->last_valid_step = NAN;
    m->best_acc = m->best_acc_step = m->best_loss = m->best_loss_step = NAN;
    m->last_lr = m->tokens = NAN;
}

// Parse the whole file. Lines that do not parse are skipped with a warning: the last one is what a run
// killed mid-write leaves, one elsewhere means the file was damaged or edited.
static void metrics_parse(Metrics *m, const char *path, char *text, size_t len) {
    metrics_init(m);
    long lineno = 0;
    for (size_t pos = 0; pos < len;) {
        char *nl = memchr(text + pos, '\n', len - pos);
        size_t end = nl ? (size_t)(nl - text) : len, n = end - pos;
        const char *line = text + pos;
        lineno++;
        pos = end + 1;
        while (n && (line[n - 1] == '\r' || line[n - 1] == ' ' || line[n - 1] == '\t')) n--;
        size_t lead = 0;
        while (lead < n && (line[lead] == ' ' || line[lead] == '\t')) lead++;
        if (lead == n) continue;  // blank line
        char why[200];
        if (read_record(m, line, n, why, sizeof(why)) == 0) continue;
        int last = 1;  // only blank lines follow?
        for (size_t k = pos; k < len && last; k++)
            last = text[k] == ' ' || text[k] == '\t' || text[k] == '\r' || text[k] == '\n';
        m->bad_lines++;
        if (!m->first_bad_line) m->first_bad_line = lineno;
        if (last) {
            m->torn_last = 1;
            mlm_warn("%s: skipping the incomplete last line %ld (the run was probably stopped while writing "
                     "it): %s", path, lineno, why);
        } else {
            mlm_warn("%s: skipping malformed line %ld: %s", path, lineno, why);
        }
    }
    m->wall_s += m->seg_time;
    Series *all[] = {&m->train_loss, &m->valid_loss, &m->train_acc, &m->valid_acc, &m->lr, &m->tps};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) series_sort(all[i]);
}

static void metrics_free(Metrics *m) {
    Series *all[] = {&m->train_loss, &m->valid_loss, &m->train_acc, &m->valid_acc, &m->lr, &m->tps};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) series_free(all[i]);
}

size_t report_downsample(const double *y, size_t n, size_t max_points, size_t *keep) {
    if (max_points < 2) max_points = 2;
    if (n <= max_points) {
        for (size_t i = 0; i < n; i++) keep[i] = i;
        return n;
    }
    size_t buckets = max_points / 2, k = 0;
    for (size_t b = 0; b < buckets; b++) {
        size_t lo = b * n / buckets, hi = (b + 1) * n / buckets, imin = lo, imax = lo;
        for (size_t i = lo + 1; i < hi; i++) {
            if (y[i] < y[imin]) imin = i;
            if (y[i] > y[imax]) imax = i;
        }
        keep[k++] = MLM_MIN(imin, imax);
        if (imin != imax) keep[k++] = MLM_MAX(imin, imax);
    }
    return k;
}

// ---------------------------------------------------------------------------------------------------------
// Text output helpers.

// HTML-escape n bytes of s. Control characters other than newline and tab are dropped: they have no
// business in a page and would show as boxes.
static void put_escaped(FILE *f, const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        switch (c) {
        case '&': fputs("&amp;", f); break;
        case '<': fputs("&lt;", f); break;
        case '>': fputs("&gt;", f); break;
        case '"': fputs("&quot;", f); break;
        case '\'': fputs("&#39;", f); break;
        default:
            if (c >= 0x20 || c == '\n' || c == '\t') fputc(c, f);
        }
    }
}

static void put_esc(FILE *f, const char *s) { put_escaped(f, s, strlen(s)); }

// 1234567 -> "1,234,567" (digits grouped so large token counts read at a glance).
static void fmt_count(double v, char *out, size_t n) {
    if (!isfinite(v)) { snprintf(out, n, "&ndash;"); return; }
    char digits[32];
    snprintf(digits, sizeof(digits), "%.0f", fabs(v));
    size_t len = strlen(digits), k = 0;
    if (v < 0 && k + 1 < n) out[k++] = '-';
    for (size_t i = 0; i < len && k + 2 < n; i++) {
        if (i && (len - i) % 3 == 0) out[k++] = ',';
        out[k++] = digits[i];
    }
    out[k] = '\0';
}

static void fmt_num(double v, const char *fmt, char *out, size_t n) {
    if (isnan(v)) snprintf(out, n, "NaN");
    else if (isinf(v)) snprintf(out, n, "%sinf", v < 0 ? "-" : "");
    else snprintf(out, n, fmt, v);
}

static void fmt_duration(double s, char *out, size_t n) {
    if (!isfinite(s) || s < 0) { snprintf(out, n, "&ndash;"); return; }
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(out, n, "%ldh %02ldm %02lds (%.1f s)", t / 3600, (t % 3600) / 60, t % 60, s);
    else if (t >= 60) snprintf(out, n, "%ldm %02lds (%.1f s)", t / 60, t % 60, s);
    else snprintf(out, n, "%.1f s", s);
}

// ---------------------------------------------------------------------------------------------------------
// Axes with "nice" ticks (1, 2 or 5 times a power of ten), after Heckbert's Graphics Gems recipe.

typedef struct {
    double lo, hi, step;  // the axis spans [lo, hi] with ticks every step
    int n;                // tick count
    double unit;          // labels show value / unit
    const char *suffix;   // appended to labels ("k", "M"), or ""
    int exp10;            // nonzero: the axis title carries x10^exp10 and labels are value / 10^exp10
    int decimals;
} Axis;

static double nice_num(double x, int round_it) {
    double e = floor(log10(x)), f = x / pow(10, e), nf;
    if (round_it) nf = f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10;
    else nf = f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10;
    return nf * pow(10, e);
}

static void axis_make(Axis *a, double lo, double hi, int target) {
    if (!(hi > lo)) {  // one point or a constant: open a window around it
        double pad = lo != 0 ? fabs(lo) * 0.1 : 1;
        lo -= pad;
        hi += pad;
    }
    a->step = nice_num(nice_num(hi - lo, 0) / (target - 1), 1);
    a->lo = floor(lo / a->step + 1e-9) * a->step;
    a->hi = ceil(hi / a->step - 1e-9) * a->step;
    a->n = (int)lround((a->hi - a->lo) / a->step) + 1;
    double mag = MLM_MAX(fabs(a->lo), fabs(a->hi));
    a->unit = 1;
    a->suffix = "";
    a->exp10 = 0;
    if (mag >= 1e4) {  // counts: 20k, 1.5M
        a->unit = mag >= 1e9 ? 1e9 : mag >= 1e6 ? 1e6 : 1e3;
        a->suffix = mag >= 1e9 ? "G" : mag >= 1e6 ? "M" : "k";
    } else if (mag < 1e-2) {  // small values (learning rates): factor the power of ten into the title
        a->exp10 = (int)floor(log10(mag));
        a->unit = pow(10, a->exp10);
    }
    a->decimals = (int)MLM_MAX(0, -floor(log10(a->step / a->unit) + 1e-9));
    if (a->decimals > 6) a->decimals = 6;
}

static double axis_tick(const Axis *a, int i) {
    double v = a->lo + i * a->step;
    return fabs(v) < a->step * 1e-6 ? 0 : v;  // no "-0"
}

static void axis_label(const Axis *a, double v, char *out, size_t n) {
    if (v == 0 && *a->suffix) snprintf(out, n, "0");  // "0", not "0k"
    else snprintf(out, n, "%.*f%s", a->decimals, v / a->unit, a->suffix);
}

// " (×10⁻³)" for an axis title, with Unicode superscripts (no markup needed, every font has them).
static void exp10_suffix(int e, char *out, size_t n) {
    static const char *sup[] = {"\xe2\x81\xb0", "\xc2\xb9", "\xc2\xb2", "\xc2\xb3", "\xe2\x81\xb4",
                                "\xe2\x81\xb5", "\xe2\x81\xb6", "\xe2\x81\xb7", "\xe2\x81\xb8", "\xe2\x81\xb9"};
    char digits[16];
    snprintf(digits, sizeof(digits), "%d", abs(e));
    snprintf(out, n, " (\xc3\x97" "10%s", e < 0 ? "\xe2\x81\xbb" : "");
    for (const char *d = digits; *d; d++) strncat(out, sup[*d - '0'], n - strlen(out) - 1);
    strncat(out, ")", n - strlen(out) - 1);
}

// ---------------------------------------------------------------------------------------------------------
// Charts.

// Geometry of every chart, in SVG user units (the page scales the SVG to its column).
enum { CW = 560, CH = 330, ML = 70, MR = 18, MT = 34, MB = 52 };
#define PLOT_W (CW - ML - MR)
#define PLOT_H (CH - MT - MB)

typedef struct {
    const Series *s;
    const char *name;   // legend text
    const char *color;
    double width;
} Curve;

typedef struct {
    const char *id;      // used in data-series attributes ("loss" -> "loss-train")
    const char *title;
    const char *ylabel;
    Curve curves[2];
    int n_curves;
} Chart;

static double map_x(const Axis *a, double v) { return ML + (v - a->lo) / (a->hi - a->lo) * PLOT_W; }
static double map_y(const Axis *a, double v) { return MT + PLOT_H - (v - a->lo) / (a->hi - a->lo) * PLOT_H; }

static void draw_axes(FILE *f, const Axis *ax, const Axis *ay, const char *xlabel, const char *ylabel) {
    char buf[64];
    fputs("<g font-size=\"11\" fill=\"#4b5563\">\n", f);
    for (int i = 0; i < ay->n; i++) {
        double v = axis_tick(ay, i), y = map_y(ay, v);
        axis_label(ay, v, buf, sizeof(buf));
        fprintf(f, "<line x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#e5e7eb\"/>"
                "<line x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#6b7280\"/>"
                "<text x=\"%d\" y=\"%.1f\" dy=\"0.32em\" text-anchor=\"end\">%s</text>\n",
                ML, ML + PLOT_W, y, y, ML - 4, ML, y, y, ML - 7, y, buf);
    }
    for (int i = 0; i < ax->n; i++) {
        double v = axis_tick(ax, i), x = map_x(ax, v);
        axis_label(ax, v, buf, sizeof(buf));
        fprintf(f, "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%d\" y2=\"%d\" stroke=\"#f0f1f3\"/>"
                "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%d\" y2=\"%d\" stroke=\"#6b7280\"/>"
                "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%s</text>\n",
                x, x, MT, MT + PLOT_H, x, x, MT + PLOT_H, MT + PLOT_H + 4, x, MT + PLOT_H + 17, buf);
    }
    fprintf(f, "<path d=\"M%d %dV%dH%d\" fill=\"none\" stroke=\"#6b7280\"/>\n", ML, MT, MT + PLOT_H, ML + PLOT_W);
    char title[160];
    snprintf(title, sizeof(title), "%s", ylabel);
    if (ay->exp10) exp10_suffix(ay->exp10, title + strlen(title), sizeof(title) - strlen(title));
    fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" font-size=\"12\" fill=\"#374151\">", ML + PLOT_W / 2,
            CH - 10);
    put_esc(f, xlabel);
    fprintf(f, "</text>\n<text transform=\"translate(16 %d) rotate(-90)\" text-anchor=\"middle\" font-size=\"12\" "
            "fill=\"#374151\">", MT + PLOT_H / 2);
    put_esc(f, title);
    fputs("</text>\n</g>\n", f);
}

// Legend in the top margin, right-aligned; text widths are estimated (no layout engine here).
static void draw_legend(FILE *f, const Chart *c) {
    double x = ML + PLOT_W;
    for (int i = c->n_curves - 1; i >= 0; i--) {
        double w = 22 + 7.0 * (double)strlen(c->curves[i].name) + (i < c->n_curves - 1 ? 16 : 0);
        x -= w;
        fprintf(f, "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"16\" y2=\"16\" stroke=\"%s\" stroke-width=\"%.1f\"/>"
                "<text x=\"%.1f\" y=\"16\" dy=\"0.32em\" font-size=\"12\" fill=\"#374151\">",
                x, x + 16, c->curves[i].color, c->curves[i].width + 0.75, x + 21);
        put_esc(f, c->curves[i].name);
        fputs("</text>\n", f);
    }
}

// One curve: a polyline of at most REPORT_MAX_DRAWN points, with markers when there are few enough to
// see (a lone point draws no line, so markers are what makes a one-point series visible).
static void draw_curve(FILE *f, const Chart *c, const Curve *cv, const Axis *ax, const Axis *ay) {
    const Series *s = cv->s;
    if (!s->n) return;
    size_t *keep = mlm_malloc(MLM_MIN(s->n, (size_t)REPORT_MAX_DRAWN) * sizeof(size_t), "chart points");
    size_t k = report_downsample(s->y, s->n, REPORT_MAX_DRAWN, keep);
    fprintf(f, "<polyline data-series=\"%s-%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"%.2f\" "
            "stroke-linejoin=\"round\" stroke-linecap=\"round\"%s points=\"", c->id, cv->name, cv->color, cv->width,
            s->n > 60 ? " stroke-opacity=\"0.85\"" : "");
    for (size_t i = 0; i < k; i++)
        fprintf(f, "%s%.1f,%.1f", i ? " " : "", map_x(ax, s->x[keep[i]]), map_y(ay, s->y[keep[i]]));
    fputs("\"/>\n", f);
    if (k <= 60) {
        fprintf(f, "<g fill=\"%s\" stroke=\"#fff\" stroke-width=\"1\">", cv->color);
        for (size_t i = 0; i < k; i++)
            fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.2\"/>", map_x(ax, s->x[keep[i]]), map_y(ay, s->y[keep[i]]));
        fputs("</g>\n", f);
    }
    free(keep);
}

static void chart_notes(FILE *f, const Chart *c) {
    for (int i = 0; i < c->n_curves; i++) {
        const Series *s = c->curves[i].s;
        if (s->nonfinite)
            fprintf(f, "<p class=\"note\">%ld non-finite %s value%s (NaN or inf) not drawn.</p>\n", s->nonfinite,
                    c->curves[i].name, s->nonfinite == 1 ? "" : "s");
        if (s->n > REPORT_MAX_DRAWN) {
            char n[32];
            fmt_count((double)s->n, n, sizeof(n));
            fprintf(f, "<p class=\"muted small\">%s: %s points, drawn as the minimum and maximum of each of %d "
                    "buckets.</p>\n", c->curves[i].name, n, REPORT_MAX_DRAWN / 2);
        }
    }
}

static void draw_chart(FILE *f, const Chart *c) {
    double xlo = INFINITY, xhi = -INFINITY, ylo = INFINITY, yhi = -INFINITY;
    for (int i = 0; i < c->n_curves; i++) {
        const Series *s = c->curves[i].s;
        for (size_t k = 0; k < s->n; k++) {
            xlo = fmin(xlo, s->x[k]); xhi = fmax(xhi, s->x[k]);
            ylo = fmin(ylo, s->y[k]); yhi = fmax(yhi, s->y[k]);
        }
    }
    fprintf(f, "<section class=\"card chart\">\n<h2>%s</h2>\n", c->title);
    fprintf(f, "<svg viewBox=\"0 0 %d %d\" role=\"img\" aria-label=\"%s\">\n", CW, CH, c->title);
    if (xlo > xhi) {  // nothing finite to draw
        fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"#fafafa\" stroke=\"#e5e7eb\"/>"
                "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" font-size=\"13\" fill=\"#6b7280\">no values "
                "logged</text>\n</svg>\n", ML, MT, PLOT_W, PLOT_H, ML + PLOT_W / 2, MT + PLOT_H / 2);
    } else {
        Axis ax, ay;
        axis_make(&ax, xlo, xhi, 6);
        axis_make(&ay, ylo, yhi, 6);
        draw_axes(f, &ax, &ay, "step", c->ylabel);
        draw_legend(f, c);
        for (int i = 0; i < c->n_curves; i++) draw_curve(f, c, &c->curves[i], &ax, &ay);
        fputs("</svg>\n", f);
    }
    chart_notes(f, c);
    fputs("</section>\n", f);
}

// ---------------------------------------------------------------------------------------------------------
// The page.

static const char *CSS =
    "*{box-sizing:border-box}\n"
    "body{margin:0;background:#f4f5f7;color:#1f2937;font:14px/1.45 system-ui,-apple-system,\"Segoe UI\",Roboto,"
    "\"Helvetica Neue\",Arial,\"DejaVu Sans\",sans-serif}\n"
    "main{max-width:1180px;margin:0 auto;padding:24px 20px 40px}\n"
    "h1{font-size:22px;margin:0 0 2px;font-weight:650}\n"
    "h2{font-size:15px;margin:0 0 8px;font-weight:600;color:#111827}\n"
    ".sub{color:#6b7280;margin:0 0 18px;font-size:13px;overflow-wrap:anywhere}\n"
    ".card{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:14px 16px;margin:0 0 16px}\n"
    ".grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:16px;margin:0 0 16px}\n"
    ".grid .card{margin:0}\n"
    "svg{display:block;width:100%;height:auto}\n"
    "table{border-collapse:collapse;width:100%}\n"
    "th,td{padding:5px 10px;border-bottom:1px solid #f0f1f3;text-align:left;vertical-align:top}\n"
    "th{font-weight:500;color:#4b5563;width:240px}\n"
    "td{font-variant-numeric:tabular-nums}\n"
    "tr:last-child th,tr:last-child td{border-bottom:0}\n"
    "pre{margin:0;padding:10px 12px;background:#f9fafb;border:1px solid #eef0f3;border-radius:6px;overflow:auto;"
    "font:12.5px/1.5 ui-monospace,\"DejaVu Sans Mono\",Menlo,Consolas,monospace}\n"
    ".note{color:#92400e;background:#fffbeb;border:1px solid #fde68a;border-radius:6px;padding:5px 10px;"
    "font-size:13px;margin:8px 0 0}\n"
    ".muted{color:#6b7280}.small{font-size:12px;margin:6px 0 0}\n"
    ".empty{padding:28px;text-align:center;color:#6b7280;font-size:15px}\n"
    ".kpis{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:12px;margin:0 0 12px}\n"
    ".kpi{border:1px solid #eef0f3;border-radius:6px;padding:8px 12px;background:#fafbfc}\n"
    ".kpi .v{font-size:20px;font-weight:600;color:#111827;font-variant-numeric:tabular-nums}\n"
    ".kpi .k{font-size:12px;color:#6b7280}\n"
    "pre.config{column-width:380px;column-gap:24px;column-rule:1px solid #eef0f3}\n";

static void page_head(FILE *f, const char *run_dir) {
    fputs("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
          "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>mlm report: ", f);
    put_esc(f, run_dir);
    fprintf(f, "</title>\n<style>\n%s</style>\n</head>\n<body>\n<main>\n<h1>Training report</h1>\n<p class=\"sub\">", CSS);
    put_esc(f, run_dir);
    char when[64] = "";
    time_t now = time(NULL);
    struct tm tmv;
    if (localtime_r(&now, &tmv)) strftime(when, sizeof(when), "%Y-%m-%d %H:%M", &tmv);
    fprintf(f, " &middot; generated %s by mlm %s</p>\n", when, MLM_VERSION);
}

static void row(FILE *f, const char *name, const char *fmt, ...) MLM_PRINTF(3, 4);
static void row(FILE *f, const char *name, const char *fmt, ...) {
    fprintf(f, "<tr><th>%s</th><td>", name);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    fputs("</td></tr>\n", f);
}

static void kpi(FILE *f, const char *name, const char *value, const char *detail) {
    fprintf(f, "<div class=\"kpi\"><div class=\"k\">%s</div><div class=\"v\">%s</div><div class=\"k\">%s</div></div>\n",
            name, value, detail);
}

// The four numbers a reader looks for first, as tiles above the table.
static void kpi_tiles(FILE *f, const Metrics *m) {
    char v[64], d[96], c[64];
    fputs("<div class=\"kpis\">\n", f);
    if (m->n_valid) {
        fmt_num(m->best_acc * 100, "%.2f%%", v, sizeof(v));
        fmt_count(m->best_acc_step, c, sizeof(c));
        snprintf(d, sizeof(d), "at step %s", c);
        kpi(f, "Best valid accuracy", v, d);
    }
    if (m->n_train) {
        fmt_num(m->last_train_loss, "%.4f", v, sizeof(v));
        fmt_count(m->last_train_step, c, sizeof(c));
        snprintf(d, sizeof(d), "at step %s", c);
        kpi(f, "Last train loss", v, d);
    }
    fmt_count(m->tokens, v, sizeof(v));
    fmt_num(m->last_epoch + 1, "%.0f", c, sizeof(c));
    snprintf(d, sizeof(d), "epoch %s", c);
    kpi(f, "Tokens seen", v, d);
    fmt_duration(m->wall_s, v, sizeof(v));
    char *paren = strstr(v, " (");  // the tile shows "1h 02m 03s"; the table has the seconds too
    if (paren) *paren = '\0';
    kpi(f, "Wall time", v, "training and validation");
    fputs("</div>\n", f);
}

static void summary_table(FILE *f, const Metrics *m) {
    char a[64], b[64], c[64];
    fputs("<section class=\"card\">\n<h2>Summary</h2>\n", f);
    kpi_tiles(f, m);
    fputs("<table class=\"summary\">\n", f);
    fmt_count(m->last_step, a, sizeof(a));
    fmt_num(m->last_epoch + 1, "%.0f", b, sizeof(b));
    row(f, "Last step", "%s (epoch %s)", a, b);
    fmt_count(m->tokens, a, sizeof(a));
    row(f, "Total tokens", "%s", a);
    fmt_duration(m->wall_s, a, sizeof(a));
    row(f, "Wall time", "%s", a);
    if (m->n_valid) {
        fmt_num(m->best_acc, "%.4f", a, sizeof(a));
        fmt_num(m->best_acc * 100, "%.2f%%", b, sizeof(b));
        fmt_count(m->best_acc_step, c, sizeof(c));
        row(f, "Best valid accuracy", "<b>%s</b> (%s) at step <b>%s</b>", a, b, c);
        fmt_num(m->best_loss, "%.4f", a, sizeof(a));
        fmt_count(m->best_loss_step, c, sizeof(c));
        row(f, "Best valid loss", "%s at step %s", a, c);
        fmt_num(m->last_valid_loss, "%.4f", a, sizeof(a));
        fmt_num(m->last_valid_acc, "%.4f", b, sizeof(b));
        fmt_count(m->last_valid_step, c, sizeof(c));
        row(f, "Last valid loss / accuracy", "%s / %s (step %s)", a, b, c);
    } else {
        row(f, "Validation", "<span class=\"muted\">no valid records yet</span>");
    }
    if (m->n_train) {
        fmt_num(m->last_train_loss, "%.4f", a, sizeof(a));
        fmt_num(m->last_train_acc, "%.4f", b, sizeof(b));
        fmt_count(m->last_train_step, c, sizeof(c));
        row(f, "Last train loss / accuracy", "%s / %s (step %s)", a, b, c);
        fmt_num(m->last_lr, "%.4g", a, sizeof(a));
        row(f, "Last learning rate", "%s", a);
        fmt_count(m->tps_count ? m->tps_sum / m->tps_count : NAN, a, sizeof(a));
        row(f, "Mean throughput", "%s tokens/s", a);
    }
    fmt_count((double)m->n_train, a, sizeof(a));
    fmt_count((double)m->n_valid, b, sizeof(b));
    row(f, "Records", "%s train, %s valid%s", a, b, m->bad_lines ? " (see the note below)" : "");
    fputs("</table>\n", f);
    if (m->torn_last)
        fputs("<p class=\"note\">The last line of metrics.jsonl is incomplete (the run was stopped while writing "
              "it, or is still writing) and was skipped.</p>\n", f);
    long other = m->bad_lines - m->torn_last;
    if (other > 0)
        fprintf(f, "<p class=\"note\">%ld malformed line%s of metrics.jsonl skipped (the first is line %ld).</p>\n",
                other, other == 1 ? "" : "s", m->first_bad_line);
    fputs("</section>\n", f);
}

static void charts(FILE *f, const Metrics *m) {
    const char *blue = "#2563eb", *orange = "#ea580c";
    Chart cs[] = {
        {"loss", "Loss", "masked-token cross-entropy",
         {{&m->train_loss, "train", blue, 1.25}, {&m->valid_loss, "valid", orange, 2}}, 2},
        {"accuracy", "Masked-token accuracy", "accuracy",
         {{&m->train_acc, "train", blue, 1.25}, {&m->valid_acc, "valid", orange, 2}}, 2},
        {"lr", "Learning rate", "learning rate", {{&m->lr, "train", blue, 1.5}}, 1},
        {"throughput", "Throughput", "tokens / s", {{&m->tps, "train", blue, 1.25}}, 1},
    };
    fputs("<div class=\"grid\">\n", f);
    for (size_t i = 0; i < sizeof(cs) / sizeof(cs[0]); i++) draw_chart(f, &cs[i]);
    fputs("</div>\n", f);
}

static char *path_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = mlm_malloc(n, "a path");
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

// samples.txt: its "epoch E step S" header becomes the caption, the rest goes in a <pre>.
static void samples_section(FILE *f, const char *run_dir) {
    char *path = path_join(run_dir, "samples.txt");
    size_t len = 0;
    char *text = mlm_read_file(path, &len);
    fputs("<section class=\"card\">\n<h2>Latest samples</h2>\n", f);
    if (!text) {
        fputs("<p class=\"muted\">No samples.txt yet (the run writes one at the start of every epoch).</p>\n", f);
    } else {
        const char *body = text;
        long epoch, step;
        char tail;
        const char *nl = memchr(text, '\n', len);
        if (nl && sscanf(text, "epoch %ld step %ld%c", &epoch, &step, &tail) == 3 &&
            (tail == '\n' || tail == '\r')) {
            fprintf(f, "<p class=\"muted small\" style=\"margin:0 0 8px\">Printed at the start of epoch %ld "
                    "(step %ld). Masked positions show the model&rsquo;s prediction; the other characters are "
                    "the input.</p>\n", epoch + 1, step);
            body = nl + 1;
        }
        fputs("<pre class=\"samples\">", f);
        put_escaped(f, body, len - (size_t)(body - text));
        fputs("</pre>\n", f);
    }
    fputs("</section>\n", f);
    free(text);
    free(path);
}

static void config_section(FILE *f, const char *run_dir) {
    char *path = path_join(run_dir, "config.conf");
    char *text = mlm_read_file(path, NULL);
    fputs("<section class=\"card\">\n<h2>Configuration</h2>\n", f);
    if (!text) fputs("<p class=\"muted\">No config.conf in the run directory.</p>\n", f);
    else { fputs("<pre class=\"config\">", f); put_esc(f, text); fputs("</pre>\n", f); }
    fputs("</section>\n", f);
    free(text);
    free(path);
}

static void write_page(FILE *f, const char *run_dir, const Metrics *m) {
    page_head(f, run_dir);
    if (m->n_train + m->n_valid == 0) {
        fputs("<section class=\"card empty\">no metrics yet: metrics.jsonl holds no train or valid records "
              "(the run logs its first line after train.log_every steps).</section>\n", f);
        if (m->bad_lines) summary_table(f, m);
    } else {
        summary_table(f, m);
        charts(f, m);
    }
    samples_section(f, run_dir);
    config_section(f, run_dir);
    fputs("</main>\n</body>\n</html>\n", f);
}

// ---------------------------------------------------------------------------------------------------------
// Entry point.

static int fail_msg(char *err, size_t errlen, const char *fmt, ...) MLM_PRINTF(3, 4);
static int fail_msg(char *err, size_t errlen, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

// Write the page to a temporary file beside out_path and rename it over: a reader (or a browser reloading
// the page during a run) never sees half a report.
static int write_atomic(const char *out_path, const char *run_dir, const Metrics *m, char *err, size_t errlen) {
    size_t n = strlen(out_path) + 32;
    char *tmp = mlm_malloc(n, "a path");
    snprintf(tmp, n, "%s.tmp.%ld", out_path, (long)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) {
        int e = errno;
        free(tmp);
        return fail_msg(err, errlen, "cannot write %s: %s; check that its directory exists and is writable, "
                        "or write the report elsewhere with --out FILE.html", out_path, strerror(e));
    }
    write_page(f, run_dir, m);
    int bad = fflush(f) != 0 || ferror(f) || fsync(fileno(f)) != 0;
    int e = errno;
    if (fclose(f) != 0 && !bad) { bad = 1; e = errno; }
    if (!bad && rename(tmp, out_path) != 0) { bad = 1; e = errno; }
    if (bad) {
        unlink(tmp);
        free(tmp);
        return fail_msg(err, errlen, "writing %s failed: %s; check the free space and permissions there, or write "
                        "the report elsewhere with --out FILE.html", out_path, strerror(e));
    }
    free(tmp);
    return 0;
}

int report_write(const char *run_dir, const char *out_path, char *err, size_t errlen) {
    if (err && errlen) err[0] = '\0';
    if (!run_dir || !*run_dir)
        return fail_msg(err, errlen, "no run directory given; pass the directory mlm train wrote (its --out DIR, "
                        "or the runs/NAME-STAMP it printed)");
    struct stat st;
    if (stat(run_dir, &st) != 0)
        return fail_msg(err, errlen, "run directory %s: %s; pass the directory mlm train wrote (its --out DIR, or "
                        "the runs/NAME-STAMP it printed)", run_dir, strerror(errno));
    if (!S_ISDIR(st.st_mode))
        return fail_msg(err, errlen, "%s is not a directory; pass the run directory (the one holding "
                        "metrics.jsonl), not a file in it", run_dir);
    char *mpath = path_join(run_dir, "metrics.jsonl");
    size_t len = 0;
    char *text = mlm_read_file(mpath, &len);
    if (!text) {
        int e = errno;
        int rc = e == ENOENT
                     ? fail_msg(err, errlen, "%s is missing: %s is not a training run directory, or its run has not "
                                "started logging yet; pass the directory mlm train wrote, or wait for its first "
                                "metrics line", mpath, run_dir)
                     : fail_msg(err, errlen, "cannot read %s: %s", mpath, strerror(e));
        free(mpath);
        return rc;
    }
    Metrics m;
    metrics_parse(&m, mpath, text, len);
    free(text);
    free(mpath);
    char *dflt = out_path ? NULL : path_join(run_dir, "report.html");
    int rc = write_atomic(out_path ? out_path : dflt, run_dir, &m, err, errlen);
    free(dflt);
    metrics_free(&m);
    return rc;
}
