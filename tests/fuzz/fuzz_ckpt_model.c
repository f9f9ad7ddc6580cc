// fuzz_ckpt_model.c: libFuzzer harness for the path from a checkpoint file to a model that `mlm fill` and
// `mlm eval` run: load the checkpoint, size a CPU model from its config and vocabulary, copy its parameters
// in, run a forward pass (fill: windows of seq_len tokens without labels; eval: masked sequences of
// batch_size with labels). This is where issue 14's bug 1 lives (n_params from the metadata copied into a
// model sized from the config).
// model sized from the config). The harness goes through ckpt_load (which validates) and cmd_cpu_model, as
// the commands do, so it fails on any checkpoint that passes validation but does not fit its model.
#include "fuzz_util.h"

#include "mlm/checkpoint.h"
#include "mlm/commands.h"
#include "mlm/cpu.h"
#include "mlm/mask.h"
#include "mlm/train.h"

// Models larger than this are not built (a harness limit on memory and time, not a property of mlm).
#define FUZZ_MAX_FLOATS (4u << 20)

// Fill-like inputs: every id of the vocabulary in turn, every third position MASK; eval-like labels.
static void make_batch(const Vocab *v, int B, int T, int *inputs, int *labels) {
    for (int i = 0; i < B * T; i++) {
        inputs[i] = i % 3 == 2 ? v->mask_id : i % v->n_chars;
        labels[i] = i % 3 == 2 ? i % v->n_chars : v->pad_id;
    }
}

// A plausible size for the model and its activations, so that a crafted config does not exhaust memory.
static int small_enough(const ModelConfig *mc, int B) {
    double acts = (double)B * mc->max_seq * ((double)mc->n_layers * (8.0 * mc->d_model + mc->d_ff + 2.0 * mc->n_heads * mc->max_seq) +
                                             mc->vocab + 4.0 * mc->d_model);
    return (double)model_num_params(mc) < FUZZ_MAX_FLOATS && acts < FUZZ_MAX_FLOATS && mc->max_seq <= 4096;
}

static void run_model(const Checkpoint *ck, int B, int with_labels) {
    // The load path of fill and eval: ckpt_load (below) validated the checkpoint, so its config must pass the
    // model check and cmd_cpu_model must find exactly ck->n_params parameters (it exits otherwise).
    ModelConfig mc = model_config_from(&ck->cfg, ck->vocab.n_tokens, ck->vocab.pad_id);
    char err[512];
    if (model_config_check(&mc, err, sizeof(err)) != 0) fuzz_fail("ckpt_load accepted a bad model config: %s", err);
    if (B < 1) fuzz_fail("ckpt_load accepted batch_size %d", B);
    if (!small_enough(&mc, B)) return;
    CpuModel *model = cmd_cpu_model(ck, B);
    int T = mc.max_seq;
    int *inputs = malloc((size_t)B * T * sizeof(int)), *labels = malloc((size_t)B * T * sizeof(int));
    if (!inputs || !labels) abort();
    make_batch(&ck->vocab, B, T, inputs, labels);
    int correct = 0;
    (void)cpu_model_forward(model, inputs, with_labels ? labels : NULL, B, ck->vocab.pad_id, NULL,
                            with_labels ? &correct : NULL);
    const float *logits = model->logits;
    float sum = 0;
    for (size_t i = 0; i < (size_t)B * T * (size_t)mc.vocab; i++) sum += logits[i];
    (void)sum;
    free(inputs);
    free(labels);
    cpu_model_free(model);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fuzz_input_file(data, size);
    Checkpoint ck;
    char err[2048];
    if (ckpt_load(path, &ck, err, sizeof(err)) != 0) return 0;  // cmd_load_ckpt: mlm_fatal, exit 2
    run_model(&ck, 1, 0);                                        // fill (one window of the 8 it can take)
    run_model(&ck, ck.cfg.batch_size, 1);                        // eval
    ckpt_free(&ck);
    return 0;
}

// libFuzzer's own mutator, for the custom one below.
size_t LLVMFuzzerMutate(uint8_t *data, size_t size, size_t max_size);

// Half of the mutations aim at the numbers of the config text in the checkpoint's header ("key = digits"):
// one digit is replaced by another, which keeps the file's layout and its tensor checksums valid, so the
// fuzzer explores configs that disagree with the stored parameters (bug 1) instead of mostly breaking the
// file's structure. The other half are libFuzzer's usual mutations.
size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size, unsigned int seed) {
    uint64_t x = seed * 0x9E3779B97F4A7C15ULL + 1;
    x ^= x >> 31;
    if (size > 16 && (x & 1)) {
        uint64_t hlen = 0;
        for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | data[i];
        size_t end = (size_t)(hlen < size - 8 ? hlen + 8 : size);
        size_t start = 8 + (size_t)((x >> 1) % (end > 8 ? end - 8 : 1));
        for (size_t i = start; i + 4 < end; i++) {
            if (data[i] == ' ' && data[i + 1] == '=' && data[i + 2] == ' ' && data[i + 3] >= '0' && data[i + 3] <= '9') {
                size_t j = i + 3, n = 0;
                while (j + n < end && data[j + n] >= '0' && data[j + n] <= '9') n++;
                data[j + (size_t)((x >> 20) % n)] = (uint8_t)('0' + (x >> 40) % 10);
                return size;
            }
        }
    }
    return LLVMFuzzerMutate(data, size, max_size);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    setenv("OMP_NUM_THREADS", "1", 0);  // one thread: reproducible, and libFuzzer's timing stays per input
    return 0;
}
