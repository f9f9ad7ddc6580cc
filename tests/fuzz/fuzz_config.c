// fuzz_config.c: libFuzzer harness for the config parser (config_parse_text, config_set_value, config_check)
// with a write-and-reparse round trip: whatever parses must be written by config_write into text that
// parses again, and that text must be a fixed point of write(parse(.)). config_write prints every key, and
// each exactly (integers, the shortest %.17g that reads back for doubles, escaped strings), so equal texts
// mean equal settings (the Configs themselves can differ in bytes after a string's NUL, which no one reads).
#include "fuzz_util.h"

#include "mlm/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = fuzz_cstring(data, size);
    Config a, b;
    config_defaults(&a);
    config_defaults(&b);
    char err[1024];
    if (config_parse_text(&a, text, "fuzz", err, sizeof(err)) == 0) {
        (void)config_check(&a, err, sizeof(err));  // cross-key checks must not crash on any parsed value
        char *w1 = fuzz_config_text(&a);
        if (config_parse_text(&b, w1, "rewritten", err, sizeof(err)) != 0)
            fuzz_fail("config_write wrote text that does not parse: %s\n--- written:\n%s", err, w1);
        char *w2 = fuzz_config_text(&b);
        if (strcmp(w1, w2) != 0) fuzz_fail("write(parse(write(c))) != write(c)\n--- first:\n%s\n--- second:\n%s", w1, w2);
        free(w1);
        free(w2);
    }
    free(text);
    return 0;
}
