// main.c: the `mlm` command line: global help and version, and the options of the train, eval, fill, export,
// info and report commands.
#define _GNU_SOURCE  // getopt_long
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sys/stat.h>

#include "mlm/checkpoint.h"
#include "mlm/commands.h"
#include "mlm/common.h"
#include "mlm/config.h"
#include "mlm/cpu_threads.h"
#include "mlm/dist.h"
#include "mlm/report.h"
#include "mlm/shards.h"
#include "mlm/train.h"
#include "mlm/wordpiece_train.h"

static void usage_main(FILE *f) {
    fputs("usage: mlm [--help] [--version] COMMAND [OPTIONS]\n\n"
          "Train and use masked language models (BERT-style; over characters, bytes or WordPiece tokens) on the CPU\n"
          "or an NVIDIA GPU.\n\n"
          "commands:\n"
          "  prepare  tokenize text files into token shards for training (char, byte or WordPiece)\n"
          "  train    train a model (the reference: mlm train --config configs/shakespeare.conf)\n"
          "  eval     masked loss, accuracy and perplexity of a checkpoint on the validation split\n"
          "  fill     predict the characters marked with _ or [MASK] in a text\n"
          "  export   write a checkpoint's weights as safetensors with PyTorch state_dict names\n"
          "  info     show a checkpoint's configuration, size, step and last metrics\n"
          "  report   write an HTML report (curves, config, samples) of a run directory\n"
          "  vocab    train a WordPiece vocabulary (vocab.txt) on text files\n\n"
          "Run `mlm COMMAND --help` for the options of a command.\n", f);
}

static void usage_train(FILE *f) {
    fputs("usage: mlm train [--config FILE] [--set KEY=VALUE]... [OPTIONS]\n\n"
          "Train on the corpus: each epoch prints samples, trains on the training split and validates.\n\n"
          "options:\n"
          "  -c, --config FILE      configuration file (`key = value` lines under [sections])\n"
          "  -s, --set KEY=VALUE    override one key, e.g. --set train.batch_size=32 (repeatable)\n"
          "      --data PATH        corpus (default: data/tinyshakespeare.txt, then $MLM_DATA_MIRROR,\n"
          "                         then a download with md5 check); any UTF-8 text works\n"
          "      --device DEV       auto, cpu or cuda (same as --set train.device=DEV)\n"
          "  -o, --out DIR          run directory (default: runs/<config>-<timestamp>)\n"
          "      --resume DIR       continue the run in DIR exactly where its last checkpoint left off\n"
          "      --init FILE|DIR    start from weights in a safetensors file (as `mlm export` writes), or (with\n"
          "                         model.arch = bert) a transformers BERT directory: BertForMaskedLM,\n"
          "                         BertForPreTraining or BertModel (config.json, model.safetensors, vocab.txt)\n"
          "      --steps N          stop after N optimizer steps (same as --set train.max_steps=N)\n"
          "      --profile-steps A:B  bracket steps A..B for Nsight (cudaProfilerStart/Stop; CUDA only);\n"
          "                         step s runs when s steps are done (the first is step 0)\n"
          "      --dry-run          load data, build batcher and masker, print the config, the vocabulary\n"
          "                         and one masked batch, then exit\n"
          "  -q, --quiet            no progress line\n"
          "  -h, --help             this help\n\n"
          "configuration keys:\n", f);
    config_print_keys(f);
}

static void usage_ckpt_command(FILE *f, const char *cmd) {
    if (!strcmp(cmd, "eval"))
        fputs("usage: mlm eval --ckpt PATH [--data PATH --split valid|all] [--seed N] [--device DEV] [--json]\n\n"
              "Masked loss, accuracy and perplexity (exp(loss)) of a checkpoint, with dropout off and masks from a\n"
              "fixed seed, so two evaluations agree exactly.\n\n"
              "options:\n"
              "  -k, --ckpt PATH   checkpoint file, or a run directory (its newest checkpoint)\n"
              "      --data PATH   evaluate on this UTF-8 text instead of the run's corpus (characters outside the\n"
              "                    checkpoint's vocabulary are dropped, with a warning); needs --split\n"
              "      --split S     valid: the validation split (the last 1 - data.train_split of the text, cut as\n"
              "                    training cuts it); all: the whole text. Default without --data: valid, on the\n"
              "                    run's corpus, which must be the file it trained on (same md5)\n"
              "                    Byte and WordPiece checkpoints: --data SET, a shard set prepared with the\n"
              "                    checkpoint's vocabulary (default: the run's data.path if unchanged), --split\n"
              "                    valid (its validation split, the default) or all (train + valid); or --data\n"
              "                    FILE --split all, a text tokenized with the checkpoint's tokenizer\n"
              "      --seed N      masking seed (default: the run's train.seed)\n"
              "      --device DEV  auto or cpu (the GPU backend does not evaluate yet)\n"
              "      --json        print one JSON object instead of the summary\n"
              "  -h, --help        this help\n", f);
    else if (!strcmp(cmd, "fill"))
        fputs("usage: mlm fill --ckpt PATH [--top-k K] [--json [--logits]] TEXT|-\n\n"
              "Predict the characters marked with _ or [MASK] in TEXT, or in each line of standard input when\n"
              "TEXT is -. Every other character must be in the checkpoint's vocabulary. A text longer than the\n"
              "model's seq_len is processed in consecutive windows of seq_len characters, each predicted on its\n"
              "own (the last one padded with [PAD]). Prints the text with the predictions filled in (highlighted\n"
              "on a terminal unless NO_COLOR is set; a predicted newline shows as \xe2\x86\xb5).\n"
              "Byte and WordPiece checkpoints tokenize TEXT with their own tokenizer (bytes; BERT's WordPiece with\n"
              "the vocab.txt stored in the checkpoint); only [MASK] marks a position (one token), pieces print as\n"
              "in vocab.txt (## kept) and --json candidates also carry their \"id\".\n\n"
              "options:\n"
              "  -k, --ckpt PATH   checkpoint file, or a run directory (its newest checkpoint)\n"
              "      --top-k K     candidates per masked position in --json output, 1 to 100000 (default 5;\n"
              "                    more than the vocabulary gives every token)\n"
              "      --json        one JSON object per input line: {\"text\", \"filled\", \"positions\": [{\"index\",\n"
              "                    \"top\": [{\"char\", \"prob\"}, ...]}]} (index counts characters, [MASK] as one;\n"
              "                    probabilities are a softmax over every token, [PAD] and [MASK] included)\n"
              "      --logits      with --json, also each masked position's raw logits\n"
              "  -h, --help        this help\n", f);
    else if (!strcmp(cmd, "export"))
        fputs("usage: mlm export --ckpt PATH --out FILE.safetensors\n"
              "       mlm export --ckpt PATH --format hf --out DIR\n\n"
              "--format safetensors (the default): write the model with its PyTorch state_dict names and shapes\n"
              "(labml_nn's TransformerMLM, or transformers' BertForMaskedLM for model.arch = bert; load it with\n"
              "safetensors.torch.load_file, or start a new run from it with mlm train --init FILE). Byte and\n"
              "WordPiece checkpoints add their tokenizer to the metadata: tokenizer, vocab_size, the special ids,\n"
              "vocab_md5 and, for WordPiece, vocab_wordpiece (the vocab.txt) and lowercase.\n"
              "--format hf (model.arch = bert, WordPiece): write DIR (new or empty) as transformers saves a\n"
              "BertForMaskedLM: config.json, model.safetensors, vocab.txt, tokenizer_config.json and\n"
              "special_tokens_map.json, for BertForMaskedLM.from_pretrained(DIR) and pipeline(\"fill-mask\").\n", f);
    else if (!strcmp(cmd, "info"))
        fputs("usage: mlm info --ckpt PATH\n\n"
              "Configuration, parameter count, step, epochs, tokens seen, training time, best validation accuracy\n"
              "and the last train/valid metrics of the run (from RUN_DIR/metrics.jsonl).\n", f);
    else if (!strcmp(cmd, "report"))
        fputs("usage: mlm report DIR [--out FILE.html]\n\n"
              "A self-contained HTML page (inline SVG) with loss, accuracy, learning-rate and throughput\n"
              "curves, the config and the latest samples of run directory DIR.\n", f);
}

// The checks of a configuration to train with: cross-key consistency, and settings under which nothing trains.
static int check_for_training(const Config *c, char *err, size_t errlen) {
    return config_check(c, err, errlen) || config_check_trainable(c, err, errlen);
}

// Cross-key checks of the final configuration, blamed on what made it fail: the --set overrides when the
// configuration before them (file, checkpoint or defaults) passes, else that configuration.
static void check_config(const Config *cfg, const Config *before_sets, const char *origin, const char **sets,
                         int n_sets) {
    char err[512], before[512];
    if (check_for_training(cfg, err, sizeof(err)) == 0) return;
    if (n_sets > 0 && check_for_training(before_sets, before, sizeof(before)) == 0) {
        // The overrides of the keys the message names (all of them if it names none).
        char list[1024] = "";
        for (int pass = 0; pass < 2 && !list[0]; pass++)
            for (int i = 0; i < n_sets; i++) {
                char key[192];
                snprintf(key, sizeof(key), "%.*s", (int)strcspn(sets[i], "="), sets[i]);
                if (pass == 0 && !strstr(err, key)) continue;
                snprintf(list + strlen(list), sizeof(list) - strlen(list), "%s--set %s", list[0] ? ", " : "", sets[i]);
            }
        mlm_fatal(MLM_EXIT_USAGE, "%s: %s (the configuration%s%s alone passes)", list, err,
                  origin ? " of " : "", origin ? origin : "");
    }
    mlm_fatal(MLM_EXIT_USAGE, "%s: %s", origin ? origin : "the built-in configuration", err);
}

static int cmd_train(int argc, char **argv) {
    static const struct option opts[] = {
        {"config", required_argument, 0, 'c'}, {"set", required_argument, 0, 's'},
        {"data", required_argument, 0, 'D'},   {"device", required_argument, 0, 'V'},
        {"out", required_argument, 0, 'o'},    {"resume", required_argument, 0, 'R'},
        {"init", required_argument, 0, 'I'},   {"steps", required_argument, 0, 'S'},
        {"profile-steps", required_argument, 0, 'P'}, {"dry-run", no_argument, 0, 'n'},
        {"quiet", no_argument, 0, 'q'},        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    Config cfg;
    config_defaults(&cfg);
    TrainOptions opt = {0};
    // Overrides apply after the config file whatever their order on the command line.
    const char **sets = mlm_calloc((size_t)argc, sizeof(char *), "--set list");
    int n_sets = 0, c;
    const char *resume = NULL, *profile = NULL;
    while ((c = getopt_long(argc, argv, "c:s:o:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'c': opt.config_path = optarg; break;
        case 's': sets[n_sets++] = optarg; break;
        case 'D': {
            static char buf[CONFIG_STR + 16];
            snprintf(buf, sizeof(buf), "data.path=%s", optarg);
            sets[n_sets++] = buf;
            break;
        }
        case 'V': {
            static char buf[64];
            snprintf(buf, sizeof(buf), "train.device=%s", optarg);
            sets[n_sets++] = buf;
            break;
        }
        case 'S': {
            static char buf[64];
            snprintf(buf, sizeof(buf), "train.max_steps=%s", optarg);
            sets[n_sets++] = buf;
            break;
        }
        case 'o': opt.out_dir = optarg; break;
        case 'R': resume = optarg; break;
        case 'I': opt.init_path = optarg; break;
        case 'P': profile = optarg; break;
        case 'n': opt.dry_run = 1; break;
        case 'q': opt.quiet = 1; break;
        case 'h': usage_train(stdout); free(sets); return 0;
        default: fputs("run `mlm train --help` for the options\n", stderr); free(sets); return MLM_EXIT_USAGE;
        }
    }
    if (optind < argc)
        mlm_fatal(MLM_EXIT_USAGE, "unexpected argument '%s' to `mlm train` (options take the form --set KEY=VALUE)",
                  argv[optind]);
    if (profile) {
        long a = -1, b = -1;
        char first[32];
        const char *colon = strchr(profile, ':');
        snprintf(first, sizeof(first), "%.*s", colon ? (int)(colon - profile) : 0, profile);
        if (!colon || strlen(profile) > 60 || mlm_parse_long(first, 0, LONG_MAX, &a) ||
            mlm_parse_long(colon + 1, 0, LONG_MAX, &b) || b < a)
            mlm_fatal(MLM_EXIT_USAGE, "--profile-steps %s: expected A:B with 0 <= A <= B, e.g. 100:110", profile);
        opt.profile = 1;
        opt.profile_first = a;
        opt.profile_last = b;
    }
    if (resume) {
        // The run's own configuration; only keys that do not change its arithmetic may be overridden.
        if (opt.config_path) mlm_fatal(MLM_EXIT_USAGE, "--resume takes the run's own configuration; drop --config");
        if (opt.init_path) mlm_fatal(MLM_EXIT_USAGE, "--resume continues from the run's checkpoint; drop --init");
        Checkpoint ck;
        char err[1024], latest[1200];
        struct stat rs;
        if (stat(resume, &rs) == 0 && S_ISDIR(rs.st_mode) && ckpt_find_latest(resume, latest, sizeof(latest)))
            mlm_fatal(MLM_EXIT_USAGE, "cannot resume: %s holds no checkpoint yet (the run stopped before its first one, "
                      "see train.ckpt_every and train.ckpt_minutes), so there is nothing to continue; start it afresh "
                      "in the same directory with: mlm train --config %s/config.conf --out %s", resume, resume, resume);
        if (ckpt_load(resume, &ck, err, sizeof(err))) mlm_fatal(MLM_EXIT_USAGE, "cannot resume: %s", err);
        cfg = ck.cfg;
        ckpt_free(&ck);
        for (int i = 0; i < n_sets; i++) {
            char key[192];
            snprintf(key, sizeof(key), "%.*s", (int)strcspn(sets[i], "="), sets[i]);
            if (!train_key_resumable(key))
                mlm_fatal(MLM_EXIT_USAGE, "--set %s: %s cannot change when resuming (it would change the run's "
                          "results); start a new run with --init instead", sets[i], key);
        }
        struct stat st;
        opt.resume_path = resume;
        if (!opt.out_dir) opt.out_dir = stat(resume, &st) == 0 && S_ISDIR(st.st_mode) ? resume : NULL;
        if (!opt.out_dir) mlm_fatal(MLM_EXIT_USAGE, "--resume FILE needs --out DIR (or pass the run directory)");
    } else if (opt.config_path) {
        config_load_file(&cfg, opt.config_path);
    }
    Config before_sets = cfg;
    for (int i = 0; i < n_sets; i++) config_set(&cfg, sets[i]);
    check_config(&cfg, &before_sets, resume ? "the run's configuration" : opt.config_path, sets, n_sets);
    free(sets);
    return train_run(&cfg, &opt);
}

// Options of the checkpoint commands; each command accepts the subset it lists in `allowed`.
typedef struct {
    const char *ckpt, *out, *data, *seed, *device, *top_k, *split, *format;
    int json, logits;
} CkptArgs;

static int parse_ckpt_args(const char *cmd, const char *allowed, int argc, char **argv, CkptArgs *a) {
    static const struct option opts[] = {
        {"ckpt", required_argument, 0, 'k'}, {"data", required_argument, 0, 'D'},
        {"seed", required_argument, 0, 'e'}, {"device", required_argument, 0, 'V'},
        {"top-k", required_argument, 0, 't'}, {"json", no_argument, 0, 'j'},
        {"logits", no_argument, 0, 'L'},     {"out", required_argument, 0, 'o'},
        {"split", required_argument, 0, 'p'}, {"format", required_argument, 0, 'F'},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    memset(a, 0, sizeof(*a));
    int c;
    while ((c = getopt_long(argc, argv, "k:o:h", opts, NULL)) != -1) {
        if (c == 'h') { usage_ckpt_command(stdout, cmd); return -1; }
        if (c == '?' || !strchr(allowed, c)) {
            for (int i = 0; c != '?' && opts[i].name; i++)
                if (opts[i].val == c) fprintf(stderr, "mlm %s: --%s does not apply to this command\n", cmd, opts[i].name);
            fprintf(stderr, "run `mlm %s --help` for the options\n", cmd);
            return MLM_EXIT_USAGE;
        }
        switch (c) {
        case 'k': a->ckpt = optarg; break;
        case 'o': a->out = optarg; break;
        case 'D': a->data = optarg; break;
        case 'e': a->seed = optarg; break;
        case 'V': a->device = optarg; break;
        case 't': a->top_k = optarg; break;
        case 'p': a->split = optarg; break;
        case 'F': a->format = optarg; break;
        case 'j': a->json = 1; break;
        case 'L': a->logits = 1; break;
        }
    }
    if (strcmp(cmd, "report") && !a->ckpt)
        mlm_fatal(MLM_EXIT_USAGE, "mlm %s: --ckpt PATH is required (a run directory, or a checkpoint in its "
                  "checkpoints/ folder)", cmd);
    if (strcmp(cmd, "fill") && strcmp(cmd, "report") && optind < argc)
        mlm_fatal(MLM_EXIT_USAGE, "mlm %s: unexpected argument '%s'; see `mlm %s --help`", cmd, argv[optind], cmd);
    return 0;
}

static int cmd_eval(int argc, char **argv) {
    CkptArgs a;
    int rc = parse_ckpt_args("eval", "kDeVjp", argc, argv, &a);
    if (rc) return rc < 0 ? 0 : rc;
    EvalOptions o = {.ckpt = a.ckpt, .data = a.data, .json = a.json, .device = DEVICE_AUTO};
    if (a.seed) {
        if (mlm_parse_u64(a.seed, UINT64_MAX, &o.seed))
            mlm_fatal(MLM_EXIT_USAGE, "--seed %s: expected a whole number from 0 to %llu in decimal digits", a.seed,
                      (unsigned long long)UINT64_MAX);
        o.has_seed = 1;
    }
    if (a.split) {
        if (!strcmp(a.split, "valid")) o.split = EVAL_SPLIT_VALID;
        else if (!strcmp(a.split, "all")) o.split = EVAL_SPLIT_ALL;
        else mlm_fatal(MLM_EXIT_USAGE, "--split %s: expected valid (the validation split) or all (the whole text)",
                       a.split);
    }
    if (a.device) {
        if (!strcmp(a.device, "auto")) o.device = DEVICE_AUTO;
        else if (!strcmp(a.device, "cpu")) o.device = DEVICE_CPU;
        else if (!strcmp(a.device, "cuda")) o.device = DEVICE_CUDA;
        else mlm_fatal(MLM_EXIT_USAGE, "--device %s: expected auto, cpu or cuda", a.device);
    }
    return eval_run(&o);
}

static int cmd_fill(int argc, char **argv) {
    CkptArgs a;
    int rc = parse_ckpt_args("fill", "ktjL", argc, argv, &a);
    if (rc) return rc < 0 ? 0 : rc;
    if (optind >= argc)
        mlm_fatal(MLM_EXIT_USAGE, "mlm fill: give the text, e.g. mlm fill --ckpt RUN 'To be or n_t to be', or - "
                  "to read lines from standard input");
    if (optind + 1 < argc)
        mlm_fatal(MLM_EXIT_USAGE, "mlm fill: one TEXT argument expected, got %d; quote the text", argc - optind);
    if (a.logits && !a.json) mlm_fatal(MLM_EXIT_USAGE, "--logits goes with --json");
    FillOptions o = {.ckpt = a.ckpt, .text = argv[optind], .top_k = 5, .json = a.json, .logits = a.logits};
    if (a.top_k) {
        long k;
        if (mlm_parse_long(a.top_k, 1, FILL_MAX_TOP_K, &k))
            mlm_fatal(MLM_EXIT_USAGE, "--top-k %s: expected a whole number from 1 to %d (the maximum; any value above "
                      "the vocabulary size gives every token)", a.top_k, FILL_MAX_TOP_K);
        o.top_k = (int)k;
    }
    return fill_run(&o);
}

static int cmd_export(int argc, char **argv) {
    CkptArgs a;
    int rc = parse_ckpt_args("export", "koF", argc, argv, &a);
    if (rc) return rc < 0 ? 0 : rc;
    int hf = a.format && !strcmp(a.format, "hf");
    if (a.format && !hf && strcmp(a.format, "safetensors"))
        mlm_fatal(MLM_EXIT_USAGE, "--format %s: expected safetensors (the default: one file with PyTorch state_dict "
                  "names) or hf (a transformers BertForMaskedLM directory, for model.arch = bert)", a.format);
    if (!a.out) mlm_fatal(MLM_EXIT_USAGE, "mlm export: --out %s is required", hf ? "DIR" : "FILE.safetensors");
    return export_run(a.ckpt, a.out, hf);
}

static int cmd_info(int argc, char **argv) {
    CkptArgs a;
    int rc = parse_ckpt_args("info", "k", argc, argv, &a);
    if (rc) return rc < 0 ? 0 : rc;
    return info_run(a.ckpt);
}

static int cmd_report(int argc, char **argv) {
    CkptArgs a;
    int rc = parse_ckpt_args("report", "o", argc, argv, &a);
    if (rc) return rc < 0 ? 0 : rc;
    if (optind >= argc) mlm_fatal(MLM_EXIT_USAGE, "mlm report: give the run directory, e.g. mlm report runs/x");
    if (optind + 1 < argc) mlm_fatal(MLM_EXIT_USAGE, "mlm report: one run directory expected, got %d", argc - optind);
    const char *dir = argv[optind];
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        mlm_fatal(MLM_EXIT_USAGE, "mlm report: %s is not a directory; give a run directory that `mlm train` wrote",
                  dir);
    char err[1024];
    if (report_write(dir, a.out, err, sizeof(err))) mlm_fatal(MLM_EXIT_FAILURE, "mlm report: %s", err);
    printf("wrote %s%s\n", a.out ? a.out : dir, a.out ? "" : "/report.html");
    return 0;
}

// Only `train` runs as several ranks. Started by mpirun -np N, any other command would run N times at once: prepare,
// export, vocab and report writing the same files, eval and fill printing N copies. Refused on every rank (each
// says it: mpirun may stop the others before they print), with exit status 2 and nothing written.
static void refuse_several_ranks(const char *cmd) {
    int rank, size = dist_launch_size(&rank);
    if (size <= 1) return;
    mlm_fatal(MLM_EXIT_USAGE, "`mlm %s` runs as one process, but it was started as rank %d of %d (mpirun, or "
              "WORLD_SIZE): each rank would run it again%s. Run it without mpirun (only `mlm train` uses several ranks)",
              cmd, rank, size, !strcmp(cmd, "prepare") || !strcmp(cmd, "export") || !strcmp(cmd, "vocab") ||
              !strcmp(cmd, "report") ? ", all writing the same files" : "");
}

int main(int argc, char **argv) {
    cpu_threads_prepare(argv);  // may re-execute mlm so that OpenMP starts with passive waiting
    if (argc < 2) {
        usage_main(stderr);
        return MLM_EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "--version") || !strcmp(cmd, "-V")) {
        printf("mlm %s (CPU matmuls: %s)\n", MLM_VERSION, MLM_BLAS_NAME);
        return 0;
    }
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        usage_main(stdout);
        return 0;
    }
    if (strcmp(cmd, "train") != 0) refuse_several_ranks(cmd);
    // Each command parses its own options: shift argv so that getopt sees the command as argv[0].
    if (!strcmp(cmd, "prepare")) return prepare_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "train")) return cmd_train(argc - 1, argv + 1);
    if (!strcmp(cmd, "eval")) return cmd_eval(argc - 1, argv + 1);
    if (!strcmp(cmd, "fill")) return cmd_fill(argc - 1, argv + 1);
    if (!strcmp(cmd, "export")) return cmd_export(argc - 1, argv + 1);
    if (!strcmp(cmd, "info")) return cmd_info(argc - 1, argv + 1);
    if (!strcmp(cmd, "report")) return cmd_report(argc - 1, argv + 1);
    if (!strcmp(cmd, "vocab")) return vocab_command(argc - 1, argv + 1);
    fprintf(stderr, "mlm: unknown command '%s'\n\n", cmd);
    usage_main(stderr);
    return MLM_EXIT_USAGE;
}
