// fuzz_checkpoint.c: libFuzzer harness for the checkpoint loader (ckpt_load: safetensors, metadata, config
// text, vocabulary, per-tensor checksums) with a save-and-reload round trip through ckpt_save. Properties:
// an accepted checkpoint holds n_params floats in each of its three arrays (all read, so ASan sees any
// overrun) and a vocabulary that is strictly ascending; saving it and loading the file back gives the same
// state, arrays, vocabulary and config.
#include "fuzz_util.h"

#include "mlm/checkpoint.h"

// Equal as the file stores them: tokens and elapsed_s are written with %.0f and %.3f, the rest exactly.
static int same_value_as_written(double a, double b, const char *fmt) {
    char x[64], y[64];
    snprintf(x, sizeof(x), fmt, a);
    snprintf(y, sizeof(y), fmt, b);
    return strcmp(x, y) == 0;
}

static int same_checkpoint(const Checkpoint *a, const Checkpoint *b) {
    size_t bytes = a->n_params * sizeof(float);
    return a->n_params == b->n_params && a->st.step == b->st.step && a->st.valid_epochs == b->st.valid_epochs &&
           a->st.best_epoch == b->st.best_epoch && same_value_as_written(a->st.tokens, b->st.tokens, "%.0f") &&
           same_value_as_written(a->st.elapsed_s, b->st.elapsed_s, "%.3f") &&
           same_value_as_written(a->st.best_valid_acc, b->st.best_valid_acc, "%.17g") &&
           memcmp(a->params, b->params, bytes) == 0 && memcmp(a->adam_m, b->adam_m, bytes) == 0 &&
           memcmp(a->adam_v, b->adam_v, bytes) == 0 && a->vocab.n_chars == b->vocab.n_chars &&
           memcmp(a->vocab.chars, b->vocab.chars, sizeof(a->vocab.chars[0]) * (size_t)a->vocab.n_chars) == 0 &&
           strcmp(a->corpus_md5, b->corpus_md5) == 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fuzz_input_file(data, size);
    Checkpoint ck;
    char err[2048];
    if (ckpt_load(path, &ck, err, sizeof(err)) != 0) return 0;
    float sum = 0;
    for (size_t i = 0; i < ck.n_params; i++) sum += ck.params[i] + ck.adam_m[i] + ck.adam_v[i];
    (void)sum;
    for (int i = 1; i < ck.vocab.n_chars; i++)
        if (ck.vocab.chars[i] <= ck.vocab.chars[i - 1]) fuzz_fail("vocabulary not strictly ascending at %d", i);

    // Round trip (steps below 0 have no file name; ckpt_save names files by step).
    if (ck.st.step >= 0) {
        char saved[1200];
        if (ckpt_save(fuzz_scratch_dir(), &ck, 1, saved, sizeof(saved), err, sizeof(err)) != 0)
            fuzz_fail("ckpt_save refused what ckpt_load accepted: %s", err);
        Checkpoint back;
        if (ckpt_load(saved, &back, err, sizeof(err)) != 0) fuzz_fail("ckpt_load refused what ckpt_save wrote: %s", err);
        if (!same_checkpoint(&ck, &back)) fuzz_fail("the checkpoint changed in a save and reload");
        char *ca = fuzz_config_text(&ck.cfg), *cb = fuzz_config_text(&back.cfg);
        if (strcmp(ca, cb) != 0) fuzz_fail("the checkpoint's config changed in a save and reload:\n%s\n---\n%s", ca, cb);
        free(ca);
        free(cb);
        ckpt_free(&back);
        unlink(saved);
    }
    ckpt_free(&ck);
    return 0;
}
