// json.c: the flat JSON object reader of json.h (metrics.jsonl lines and similar one-object records).
#include "mlm/json.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "mlm/common.h"

// Parser state: input span, write cursor into the object's buffer (unescaped text is never longer than its
// escaped form, so a buffer of len + 1 bytes always suffices) and the first error.
typedef struct {
    const char *s;
    size_t len, pos;
    char *out;
    size_t out_pos;
    char *err;
    size_t errlen;
    int failed;
} Parser;

static int fail(Parser *p, const char *fmt, ...) MLM_PRINTF(2, 3);
static int fail(Parser *p, const char *fmt, ...) {
    if (p->failed) return -1;
    p->failed = 1;
    if (p->err && p->errlen) {
        char msg[160];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        snprintf(p->err, p->errlen, "%s at byte %zu", msg, p->pos);
    }
    return -1;
}

static int peek(const Parser *p) { return p->pos < p->len ? (unsigned char)p->s[p->pos] : -1; }

static void skip_ws(Parser *p) {
    for (int c = peek(p); c == ' ' || c == '\t' || c == '\r' || c == '\n'; c = peek(p)) p->pos++;
}

static int expect(Parser *p, char c) {
    skip_ws(p);
    if (peek(p) != (unsigned char)c) {
        if (peek(p) < 0) return fail(p, "expected '%c' but the text ended (a torn line?)", c);
        return fail(p, "expected '%c', found '%c'", c, p->s[p->pos]);
    }
    p->pos++;
    return 0;
}

static int hex4(Parser *p, unsigned *out) {
    if (p->len - p->pos < 4) return fail(p, "truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p->s[p->pos++];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return fail(p, "bad hex digit in \\u escape");
    }
    *out = v;
    return 0;
}

// A code point as UTF-8. A \uXXXX escape is 6 bytes in and at most 3 out (4 out for a 12-byte pair).
static void put_utf8(Parser *p, unsigned cp) {
    char *o = p->out + p->out_pos;
    if (cp < 0x80) { o[0] = (char)cp; p->out_pos += 1; }
    else if (cp < 0x800) { o[0] = (char)(0xC0 | cp >> 6); o[1] = (char)(0x80 | (cp & 0x3F)); p->out_pos += 2; }
    else if (cp < 0x10000) {
        o[0] = (char)(0xE0 | cp >> 12); o[1] = (char)(0x80 | ((cp >> 6) & 0x3F)); o[2] = (char)(0x80 | (cp & 0x3F));
        p->out_pos += 3;
    } else {
        o[0] = (char)(0xF0 | cp >> 18); o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        o[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); o[3] = (char)(0x80 | (cp & 0x3F));
        p->out_pos += 4;
    }
}

static int unicode_escape(Parser *p) {
    unsigned cp;
    if (hex4(p, &cp)) return -1;
    if (cp >= 0xD800 && cp <= 0xDBFF) {  // a high surrogate must be followed by \u and a low one
        unsigned lo;
        if (p->len - p->pos < 2 || p->s[p->pos] != '\\' || p->s[p->pos + 1] != 'u')
            return fail(p, "unpaired surrogate in \\u escape");
        p->pos += 2;
        if (hex4(p, &lo)) return -1;
        if (lo < 0xDC00 || lo > 0xDFFF) return fail(p, "unpaired surrogate in \\u escape");
        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
    } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
        return fail(p, "unpaired surrogate in \\u escape");
    }
    put_utf8(p, cp);
    return 0;
}

// A string literal, unescaped into the buffer; *out points at its NUL-terminated copy.
static int parse_string(Parser *p, const char **out) {
    if (expect(p, '"')) return -1;
    char *start = p->out + p->out_pos;
    for (;;) {
        int c = peek(p);
        if (c < 0) return fail(p, "unterminated string (a torn line?)");
        p->pos++;
        if (c == '"') break;
        if (c < 0x20) return fail(p, "control character 0x%02x inside a string", c);
        if (c != '\\') { p->out[p->out_pos++] = (char)c; continue; }
        c = peek(p);
        if (c < 0) return fail(p, "unterminated escape");
        p->pos++;
        const char *from = "\"\\/bfnrt", *to = "\"\\/\b\f\n\r\t";
        const char *hit = strchr(from, c);
        if (c == 'u') { if (unicode_escape(p)) return -1; }
        else if (hit && c) p->out[p->out_pos++] = to[hit - from];
        else return fail(p, "bad escape '\\%c'", c);
    }
    p->out[p->out_pos++] = '\0';
    *out = start;
    return 0;
}

// The non-finite spellings a C or JavaScript writer produces.
static int parse_nonfinite(Parser *p, double *out) {
    static const struct { const char *word; double v; } words[] = {
        {"-infinity", -INFINITY}, {"infinity", INFINITY}, {"-inf", -INFINITY}, {"inf", INFINITY},
        {"-nan", NAN}, {"nan", NAN},
    };
    for (size_t i = 0; i < sizeof(words) / sizeof(words[0]); i++) {
        size_t n = strlen(words[i].word);
        if (p->len - p->pos >= n && !strncasecmp(p->s + p->pos, words[i].word, n)) {
            // printf may append a payload, e.g. "nan(0x8000)"; take it too.
            p->pos += n;
            if (peek(p) == '(') {
                while (p->pos < p->len && p->s[p->pos] != ')') p->pos++;
                if (p->pos < p->len) p->pos++;
            }
            *out = words[i].v;
            return 0;
        }
    }
    return fail(p, "expected a value");
}

static int digits(Parser *p) {
    size_t start = p->pos;
    while (peek(p) >= '0' && peek(p) <= '9') p->pos++;
    return p->pos > start;
}

// A number by the JSON grammar, then strtod on exactly that span (so strtod's extras, hex and the
// like, never leak in and the result does not depend on what follows).
static int parse_number(Parser *p, double *out) {
    size_t start = p->pos;
    if (peek(p) == '-') p->pos++;
    if (!digits(p)) { p->pos = start; return parse_nonfinite(p, out); }
    if (peek(p) == '.') { p->pos++; if (!digits(p)) return fail(p, "digits expected after '.'"); }
    if (peek(p) == 'e' || peek(p) == 'E') {
        p->pos++;
        if (peek(p) == '+' || peek(p) == '-') p->pos++;
        if (!digits(p)) return fail(p, "digits expected in the exponent");
    }
    char tmp[64];
    size_t n = p->pos - start;
    if (n >= sizeof(tmp)) return fail(p, "number too long");
    memcpy(tmp, p->s + start, n);
    tmp[n] = '\0';
    *out = strtod(tmp, NULL);
    return 0;
}

// Skip a nested array or object, minding strings so that brackets inside them do not count.
static int skip_nested(Parser *p) {
    int depth = 0;
    do {
        int c = peek(p);
        if (c < 0) return fail(p, "unterminated nested value (a torn line?)");
        if (c == '"') {
            size_t mark = p->out_pos;
            const char *ignored;
            if (parse_string(p, &ignored)) return -1;
            p->out_pos = mark;  // reuse the buffer space: the text is dropped
            continue;
        }
        p->pos++;
        if (c == '[' || c == '{') depth++;
        else if (c == ']' || c == '}') depth--;
        if (depth > 64) return fail(p, "nesting too deep");
    } while (depth > 0);
    return 0;
}

static int literal(Parser *p, const char *word) {
    size_t n = strlen(word);
    if (p->len - p->pos < n || strncmp(p->s + p->pos, word, n)) return fail(p, "expected a value");
    p->pos += n;
    return 0;
}

static int parse_value(Parser *p, JsonField *f) {
    skip_ws(p);
    int c = peek(p);
    f->num = NAN;
    f->str = NULL;
    if (c < 0) return fail(p, "expected a value but the text ended (a torn line?)");
    if (c == '"') { f->type = JSON_STRING; return parse_string(p, &f->str); }
    if (c == '{' || c == '[') { f->type = JSON_OTHER; return skip_nested(p); }
    if (c == 't') { f->type = JSON_BOOL; f->num = 1; return literal(p, "true"); }
    if (c == 'f') { f->type = JSON_BOOL; f->num = 0; return literal(p, "false"); }
    if (c == 'n' && p->len - p->pos >= 4 && !strncmp(p->s + p->pos, "null", 4)) {
        f->type = JSON_NULL;
        return literal(p, "null");
    }
    f->type = JSON_NUMBER;
    return parse_number(p, &f->num);
}

// Store a parsed field; a repeated key replaces the earlier value.
static int add_field(Parser *p, JsonObject *o, const JsonField *f) {
    for (int i = 0; i < o->n; i++)
        if (!strcmp(o->fields[i].key, f->key)) { o->fields[i] = *f; return 0; }
    if (o->n == JSON_MAX_FIELDS) return fail(p, "more than %d keys", JSON_MAX_FIELDS);
    o->fields[o->n++] = *f;
    return 0;
}

static int parse_members(Parser *p, JsonObject *o) {
    if (expect(p, '{')) return -1;
    skip_ws(p);
    if (peek(p) == '}') { p->pos++; return 0; }
    for (;;) {
        JsonField f;
        skip_ws(p);
        if (parse_string(p, &f.key) || expect(p, ':') || parse_value(p, &f) || add_field(p, o, &f)) return -1;
        skip_ws(p);
        int c = peek(p);
        if (c == ',') { p->pos++; continue; }
        if (c == '}') { p->pos++; return 0; }
        if (c < 0) return fail(p, "expected ',' or '}' but the text ended (a torn line?)");
        return fail(p, "expected ',' or '}', found '%c'", c);
    }
}

int json_parse_object(const char *text, size_t len, JsonObject *o, char *err, size_t errlen) {
    memset(o, 0, sizeof(*o));
    if (err && errlen) err[0] = '\0';
    Parser p = {.s = text, .len = len, .err = err, .errlen = errlen};
    p.out = mlm_malloc(len + 1, "a JSON object");
    o->buf = p.out;
    if (parse_members(&p, o) == 0) {
        skip_ws(&p);
        if (p.pos == len) return 0;
        fail(&p, "unexpected text after the object");
    }
    json_free(o);
    return -1;
}

void json_free(JsonObject *o) {
    free(o->buf);
    memset(o, 0, sizeof(*o));
}

const JsonField *json_get(const JsonObject *o, const char *key) {
    for (int i = 0; i < o->n; i++)
        if (!strcmp(o->fields[i].key, key)) return &o->fields[i];
    return NULL;
}

double json_num(const JsonObject *o, const char *key, double missing) {
    const JsonField *f = json_get(o, key);
    return f && (f->type == JSON_NUMBER || f->type == JSON_BOOL) ? f->num : missing;
}

const char *json_str(const JsonObject *o, const char *key) {
    const JsonField *f = json_get(o, key);
    return f && f->type == JSON_STRING ? f->str : NULL;
}
