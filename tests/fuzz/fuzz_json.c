// fuzz_json.c: libFuzzer harness for the JSON object reader (json_parse_object and its lookups), as train
// and info read metrics.jsonl lines. Properties: a failure leaves the object empty; every parsed field is
// found again by its key with the same type and value; numbers of JSON_NUMBER fields are what json_num gives.
#include "fuzz_util.h"

#include <math.h>

#include "mlm/json.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    // A copy of exactly `size` bytes (no NUL after it) so that a read past the end is caught by ASan.
    char *text = malloc(size ? size : 1);
    if (!text) abort();
    memcpy(text, data, size);
    JsonObject o;
    char err[256];
    if (json_parse_object(text, size, &o, err, sizeof(err)) != 0) {
        if (o.n != 0) fuzz_fail("a failed parse left %d fields", o.n);
    } else {
        if (o.n < 0 || o.n > JSON_MAX_FIELDS) fuzz_fail("%d fields", o.n);
        for (int i = 0; i < o.n; i++) {
            const JsonField *f = &o.fields[i];
            const JsonField *g = json_get(&o, f->key);
            if (!g || g->type != f->type) fuzz_fail("field '%s' is not found again by its key", f->key);
            (void)strlen(f->key);  // keys and strings are NUL-terminated inside the object's buffer
            if (f->type == JSON_STRING) {
                if (!f->str) fuzz_fail("string field '%s' has no string", f->key);
                (void)strlen(f->str);
                if (json_str(&o, f->key) != g->str) fuzz_fail("json_str disagrees with json_get for '%s'", f->key);
            }
            if (f->type == JSON_NUMBER || f->type == JSON_BOOL) {
                double v = json_num(&o, f->key, -12345.0);
                if (!(v == g->num || (isnan(v) && isnan(g->num)))) fuzz_fail("json_num disagrees for '%s'", f->key);
            }
        }
        // Keys are unique (a repeated key keeps its last value).
        for (int i = 0; i < o.n; i++)
            for (int j = i + 1; j < o.n; j++)
                if (strcmp(o.fields[i].key, o.fields[j].key) == 0) fuzz_fail("key '%s' held twice", o.fields[i].key);
        json_free(&o);
    }
    free(text);
    return 0;
}
