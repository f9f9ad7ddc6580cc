// test_config.c: the config parser: sections, overrides, errors that name file, line and key, round trip.
#include <stdlib.h>
#include <string.h>

#include <limits.h>
#include <stdint.h>

#include "mlm/common.h"
#include "mlm/config.h"
#include "test_util.h"

static int parses(const char *text, char *err, size_t errlen) {
    Config c;
    config_defaults(&c);
    return config_parse_text(&c, text, "t.conf", err, errlen) == 0;
}

int main(void) {
    Config c;
    char err[1024];
    config_defaults(&c);
    const char *text = "# comment\n[model]\nd_model = 64   # trailing comment\nn_heads=4\n\n[train]\nbatch_size = 16\n"
                       "eval_dropout = true\ndevice = cpu\n[mask]\nno_mask = \"\\n#\"\nscheme = bert\n"
                       "[optim]\nlr = 3e-4\n";
    CHECK(config_parse_text(&c, text, "t.conf", err, sizeof(err)) == 0, "parse failed: %s", err);
    CHECK(c.d_model == 64 && c.n_heads == 4, "d_model %d n_heads %d", c.d_model, c.n_heads);
    CHECK(c.batch_size == 16 && c.eval_dropout == 1 && c.device == DEVICE_CPU, "train keys");
    CHECK(strcmp(c.no_mask_chars, "\n#") == 0, "no_mask '%s'", c.no_mask_chars);
    CHECK(c.mask_scheme == MASK_SCHEME_BERT, "scheme %d", c.mask_scheme);
    CHECK(c.lr == 3e-4, "lr %g", c.lr);
    // Sparse prediction: off by default (the reference), a boolean key.
    Config sp;
    config_defaults(&sp);
    CHECK(sp.sparse_prediction == 0, "train.sparse_prediction is on by default");
    CHECK(config_set_value(&sp, "train.sparse_prediction", "true", err, sizeof(err)) == 0 && sp.sparse_prediction == 1,
          "train.sparse_prediction = true: %s", err);
    // train.precision (fp32 | tf32 | bf16; tf32 by default) and the key it replaced: a file of an earlier run that
    // says train.tf32 = true | false reads as tf32 | fp32; the resolved configuration writes train.precision only.
    Config pr;
    config_defaults(&pr);
    CHECK(pr.precision == PRECISION_TF32, "train.precision defaults to %d, not tf32", pr.precision);
    CHECK(config_set_value(&pr, "train.precision", "bf16", err, sizeof(err)) == 0 && pr.precision == PRECISION_BF16,
          "train.precision = bf16: %s", err);
    CHECK(config_parse_text(&pr, "[train]\ntf32 = false\n", "old.conf", err, sizeof(err)) == 0 &&
          pr.precision == PRECISION_FP32, "train.tf32 = false did not read as fp32: %s", err);
    CHECK(config_parse_text(&pr, "[train]\ntf32 = true\n", "old.conf", err, sizeof(err)) == 0 &&
          pr.precision == PRECISION_TF32, "train.tf32 = true did not read as tf32: %s", err);
    CHECK(!parses("[train]\ntf32 = maybe\n", err, sizeof(err)) && strstr(err, "train.precision"),
          "a bad train.tf32 does not name train.precision: %s", err);
    CHECK(!parses("[train]\nprecision = fp16\n", err, sizeof(err)) && strstr(err, "fp32|tf32|bf16"),
          "train.precision = fp16 accepted or the choices unnamed: %s", err);
    {
        char *buf = NULL;
        size_t len = 0;
        FILE *mf = open_memstream(&buf, &len);
        pr.precision = PRECISION_BF16;
        config_write(mf, &pr);
        fclose(mf);
        CHECK(strstr(buf, "precision = bf16") && !strstr(buf, "tf32"), "written configuration: %s", buf);
        free(buf);
    }

    // Errors name the file, the line and the key.
    CHECK(!parses("[model]\nd_modle = 3\n", err, sizeof(err)), "unknown key accepted");
    CHECK(strstr(err, "t.conf:2") && strstr(err, "model.d_modle") && strstr(err, "model.d_model"), "message: %s", err);
    CHECK(!parses("[train]\nbatch_size = -1\n", err, sizeof(err)), "negative batch accepted");
    CHECK(strstr(err, "t.conf:2") && strstr(err, "train.batch_size") && strstr(err, "out of range"), "message: %s", err);
    CHECK(!parses("[train]\nbatch_size = 3.5\n", err, sizeof(err)), "fractional int accepted");
    CHECK(!parses("[train]\nbatch_size = 12abc\n", err, sizeof(err)), "trailing junk accepted");
    CHECK(!parses("[model\n", err, sizeof(err)), "bad section accepted");
    CHECK(strstr(err, "t.conf:1"), "message: %s", err);
    CHECK(!parses("[model]\njust words\n", err, sizeof(err)), "line without '=' accepted");
    CHECK(!parses("[train]\ndevice = tpu\n", err, sizeof(err)), "bad enum accepted");
    CHECK(strstr(err, "auto|cpu|cuda"), "message lists the choices: %s", err);
    CHECK(!parses("[train]\neval_dropout = maybe\n", err, sizeof(err)), "bad bool accepted");
    CHECK(!parses("[model]\ndropout = nan\n", err, sizeof(err)), "nan accepted");
    CHECK(!parses("[train]\nseed = -5\n", err, sizeof(err)), "negative seed accepted");

    // Bug 7: integers are plain decimal digits in range; nothing is reinterpreted (0x20 was 32, and -1 as a seed
    // wrapped to 2^64 - 1 on some paths).
    static const char *const bad_ints[] = {"[model]\nd_model = 0x20\n", "[train]\nseed = -1\n", "[train]\nepochs = +3\n",
                                           "[train]\nbatch_size = 1e1\n", "[train]\nbatch_size = 16.0\n",
                                           "[model]\nd_model = 040x\n", "[train]\nseed = 18446744073709551616\n",
                                           "[train]\nmax_steps = 9223372036854775808\n", "[train]\nseed = 0x10\n"};
    for (size_t i = 0; i < sizeof(bad_ints) / sizeof(bad_ints[0]); i++) {
        CHECK(!parses(bad_ints[i], err, sizeof(err)), "accepted: %s", bad_ints[i]);
        CHECK(strstr(err, "t.conf:2"), "message should name the line: %s", err);
    }
    config_defaults(&c);
    CHECK(config_set_value(&c, "model.d_model", "0x20", err, sizeof(err)) != 0 && strstr(err, "decimal"), "%s", err);
    CHECK(config_set_value(&c, "train.seed", "18446744073709551615", err, sizeof(err)) == 0 &&
          c.seed == 18446744073709551615ull, "the largest seed: %s", err);
    CHECK(config_set_value(&c, "train.max_steps", "0", err, sizeof(err)) == 0 && c.max_steps == 0, "%s", err);
    CHECK(config_set_value(&c, "model.d_model", "040", err, sizeof(err)) == 0 && c.d_model == 40,
          "a leading zero is still decimal (not octal): %d", c.d_model);
    long v = 0;
    uint64_t u = 0;
    CHECK(mlm_parse_long("-12", -20, 20, &v) == 0 && v == -12, "-12");
    CHECK(mlm_parse_long("21", -20, 20, &v) == 2 && mlm_parse_long("-21", -20, 20, &v) == 2, "range");
    CHECK(mlm_parse_long("", 0, 9, &v) == 1 && mlm_parse_long("-", 0, 9, &v) == 1 && mlm_parse_long(" 1", 0, 9, &v) == 1 &&
          mlm_parse_long("1 ", 0, 9, &v) == 1 && mlm_parse_long("+1", 0, 9, &v) == 1, "only digits");
    CHECK(mlm_parse_long("99999999999999999999", 0, LONG_MAX, &v) == 2, "overflow is out of range");
    CHECK(mlm_parse_u64("-0", UINT64_MAX, &u) == 2 && mlm_parse_u64("18446744073709551616", UINT64_MAX, &u) == 2,
          "u64 range");
    // New keys round-trip and resume-safe keys.
    CHECK(parses("[train]\nckpt_minutes = 0.5\ninit_check_vocab = false\n", err, sizeof(err)), "%s", err);

    // Overrides use full dotted keys.
    config_defaults(&c);
    CHECK(config_set_value(&c, "model.n_layers", "2", err, sizeof(err)) == 0, "%s", err);
    CHECK(c.n_layers == 2, "n_layers %d", c.n_layers);
    CHECK(config_set_value(&c, "n_layers", "2", err, sizeof(err)) != 0 && strstr(err, "model.n_layers"),
          "section-less key should suggest the full one: %s", err);

    // Cross-key checks.
    config_defaults(&c);
    c.n_heads = 7;
    CHECK(config_check(&c, err, sizeof(err)) != 0 && strstr(err, "n_heads"), "heads not dividing d_model: %s", err);

    // Settings under which nothing trains (issue 22, bug 11): refused for training, with the reason. Adam runs in
    // float, so an eps whose float is 0 (below half the smallest subnormal, 7e-46) is refused; the smallest
    // subnormal (1e-45 rounds to 1.4e-45) keeps 0 / eps finite and passes.
    config_defaults(&c);
    CHECK(config_check_trainable(&c, err, sizeof(err)) == 0, "the defaults should train: %s", err);
    double bad_eps[] = {0.0, 1e-46, 5e-46}, good_eps[] = {1e-45, 1e-8, 1.0};
    for (int i = 0; i < 3; i++) {
        config_defaults(&c);
        c.eps = bad_eps[i];
        CHECK(config_check_trainable(&c, err, sizeof(err)) != 0 && strstr(err, "optim.eps") && strstr(err, "NaN"),
              "optim.eps = %g (float %g) should be refused: %s", bad_eps[i], (double)(float)bad_eps[i], err);
        c.eps = good_eps[i];
        CHECK(config_check_trainable(&c, err, sizeof(err)) == 0, "optim.eps = %g should pass: %s", good_eps[i], err);
    }
    config_defaults(&c);
    c.mask_prob = 0.0;
    CHECK(config_check_trainable(&c, err, sizeof(err)) != 0 && strstr(err, "mask.prob"), "mask.prob = 0: %s", err);
    CHECK(config_check(&c, err, sizeof(err)) == 0, "mask.prob = 0 is consistent (a checkpoint with it still loads)");
    c.mask_prob = 1.0;
    CHECK(config_check_trainable(&c, err, sizeof(err)) == 0, "mask.prob = 1 should pass: %s", err);

    // Round trip: write the resolved config, parse it back, get the same struct.
    config_defaults(&c);
    c.d_model = 96; c.seed = 18446744073709551615ull; c.ckpt_minutes = 2.5; c.init_check_vocab = 0; c.lr = 0.123456789012345; c.mask_scheme = MASK_SCHEME_BERT;
    snprintf(c.no_mask_chars, sizeof(c.no_mask_chars), "a\"\\\n");
    snprintf(c.data_path, sizeof(c.data_path), "/tmp/x y.txt");
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    config_write(f, &c);
    fclose(f);
    Config back;
    config_defaults(&back);
    CHECK(config_parse_text(&back, buf, "roundtrip", err, sizeof(err)) == 0, "re-parse: %s", err);
    CHECK(memcmp(&c, &back, sizeof(c)) == 0, "round trip changed the config:\n%s", buf);
    free(buf);

    // The shipped reference config equals the built-in defaults (which follow SPEC.md).
    const char *src = getenv("MLM_SOURCE_DIR");
    if (src) {
        char path[1024];
        snprintf(path, sizeof(path), "%s/configs/shakespeare.conf", src);
        Config ref, def;
        config_defaults(&def);
        config_defaults(&ref);
        config_load_file(&ref, path);
        CHECK(memcmp(&ref, &def, sizeof(ref)) == 0, "configs/shakespeare.conf differs from the defaults");
        CHECK(ref.batch_size == 64 && ref.seq_len == 32 && ref.d_model == 128 && ref.d_ff == 256 && ref.n_heads == 8 &&
              ref.n_layers == 6 && ref.epochs == 1024 && ref.warmup == 2000, "reference values");
    }
    return test_finish("test_config");
}
