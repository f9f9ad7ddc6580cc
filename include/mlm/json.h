// json.h: a tiny reader for flat JSON objects of numbers and strings (one object a line, as in metrics.jsonl).
//
// Scope on purpose: one object of "key": value pairs. Values may be numbers, strings, true/false or null;
// nested objects and arrays are skipped (their key reads as JSON_OTHER) so that unknown keys never break a
// reader. Besides JSON numbers it accepts the spellings C's printf gives non-finite values (nan, -nan, inf,
// -inf) and JavaScript's (NaN, Infinity), because a diverging run writes them.
#ifndef MLM_JSON_H
#define MLM_JSON_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define JSON_MAX_FIELDS 64

typedef enum { JSON_NUMBER, JSON_STRING, JSON_BOOL, JSON_NULL, JSON_OTHER } JsonType;

typedef struct {
    const char *key;  // unescaped, NUL-terminated (points into the object's buffer)
    JsonType type;
    double num;       // JSON_NUMBER: the value; JSON_BOOL: 1 or 0; otherwise NaN
    const char *str;  // JSON_STRING: unescaped UTF-8 (a \u0000 escape ends it early); otherwise NULL
} JsonField;

typedef struct {
    int n;
    JsonField fields[JSON_MAX_FIELDS];
    char *buf;  // owns the keys and strings; release with json_free
} JsonObject;

// Parse one object from text[0..len) (surrounding whitespace allowed, nothing else). Returns 0 on success;
// on failure returns -1, leaves *o empty and writes the reason and its byte offset into err.
// A key that appears twice keeps its last value; more than JSON_MAX_FIELDS distinct keys is an error.
int json_parse_object(const char *text, size_t len, JsonObject *o, char *err, size_t errlen);
void json_free(JsonObject *o);

// Lookups: the field named key, or NULL. json_num gives the number (or bool) or `missing` when the key is
// absent or not a number; json_str gives the string or NULL.
const JsonField *json_get(const JsonObject *o, const char *key);
double json_num(const JsonObject *o, const char *key, double missing);
const char *json_str(const JsonObject *o, const char *key);

#ifdef __cplusplus
}
#endif

#endif
