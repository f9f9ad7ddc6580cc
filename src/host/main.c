// main.c: the `mlm` command line: global help and version, and the train, eval, fill, export, info and
// report commands with their options.
#define _GNU_SOURCE  // getopt_long
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sys/stat.h>

#include "mlm/checkpoint.h"
#include "mlm/common.h"
#include "mlm/config.h"
#include "mlm/train.h"

static void usage_main(FILE *f) {
    fputs("usage: mlm [--help] [--version] COMMAND [OPTIONS]\n\n"
          "Train and use character-level masked language models (BERT-style) on the CPU or an NVIDIA GPU.\n\n"
          "commands:\n"
          "  train    train a model (the reference: mlm train --config configs/shakespeare.conf)\n"
          "  eval     masked loss, accuracy and perplexity of a checkpoint on the validation split\n"
          "  fill     predict the characters marked with _ or [MASK] in a text\n"
          "  export   write a checkpoint's weights as safetensors with PyTorch state_dict names\n"
          "  info     show a checkpoint's configuration, size, step and last metrics\n"
          "  report   write an HTML report (curves, config, samples) of a run directory\n\n"
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
          "      --init FILE        start from weights in a safetensors file (as `mlm export` writes)\n"
          "      --steps N          stop after N optimizer steps (same as --set train.max_steps=N)\n"
          "      --profile-steps A:B  bracket steps A..B for Nsight (cudaProfilerStart/Stop; CUDA only)\n"
          "      --dry-run          load data, build batcher and masker, print the config, the vocabulary\n"
          "                         and one masked batch, then exit\n"
          "  -q, --quiet            no progress line\n"
          "  -h, --help             this help\n\n"
          "configuration keys:\n", f);
    config_print_keys(f);
}

static void usage_ckpt_command(FILE *f, const char *cmd) {
    if (!strcmp(cmd, "eval"))
        fputs("usage: mlm eval --ckpt PATH [--data PATH] [--seed N] [--device DEV]\n\n"
              "Masked loss, accuracy and perplexity on the validation split (or the whole of --data),\n"
              "with a fixed seed so two evaluations agree.\n", f);
    else if (!strcmp(cmd, "fill"))
        fputs("usage: mlm fill --ckpt PATH [--top-k K] [--json] TEXT|-\n\n"
              "Predict the characters marked with _ or [MASK] in TEXT (or in each line of standard input\n"
              "when TEXT is -). --json prints the top-k characters and probabilities per position.\n", f);
    else if (!strcmp(cmd, "export"))
        fputs("usage: mlm export --ckpt PATH --out FILE.safetensors\n\n"
              "Write the model with the reference's PyTorch state_dict names and shapes.\n", f);
    else if (!strcmp(cmd, "info"))
        fputs("usage: mlm info --ckpt PATH\n\nConfig, parameter count, step, tokens seen, last metrics.\n", f);
    else if (!strcmp(cmd, "report"))
        fputs("usage: mlm report DIR [--out FILE.html]\n\n"
              "A self-contained HTML page (inline SVG) with loss, accuracy, learning-rate and throughput\n"
              "curves, the config and the latest samples of run directory DIR.\n", f);
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
        long a, b;
        char tail;
        if (sscanf(profile, "%ld:%ld%c", &a, &b, &tail) != 2 || a < 0 || b < a)
            mlm_fatal(MLM_EXIT_USAGE, "--profile-steps %s: expected A:B with 0 <= A <= B, e.g. 100:110", profile);
    }
    if (resume) {
        // The run's own configuration; only keys that do not change its arithmetic may be overridden.
        if (opt.config_path) mlm_fatal(MLM_EXIT_USAGE, "--resume takes the run's own configuration; drop --config");
        if (opt.init_path) mlm_fatal(MLM_EXIT_USAGE, "--resume continues from the run's checkpoint; drop --init");
        Checkpoint ck;
        char err[1024];
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
    for (int i = 0; i < n_sets; i++) config_set(&cfg, sets[i]);
    free(sets);
    config_validate(&cfg, opt.config_path ? opt.config_path : "configuration");
    return train_run(&cfg, &opt);
}

// eval, fill, export, info and report: options are parsed and checked here; the commands land with the
// checkpoint format.
static int cmd_other(const char *cmd, int argc, char **argv) {
    static const struct option opts[] = {
        {"ckpt", required_argument, 0, 'k'}, {"data", required_argument, 0, 'D'},
        {"seed", required_argument, 0, 'e'}, {"device", required_argument, 0, 'V'},
        {"top-k", required_argument, 0, 't'}, {"json", no_argument, 0, 'j'},
        {"out", required_argument, 0, 'o'},  {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    const char *ckpt = NULL, *out = NULL;
    int c;
    while ((c = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
        switch (c) {
        case 'k': ckpt = optarg; break;
        case 'o': out = optarg; break;
        case 'h': usage_ckpt_command(stdout, cmd); return 0;
        case 'D': case 'e': case 'V': case 't': case 'j': break;
        default: fprintf(stderr, "run `mlm %s --help` for the options\n", cmd); return MLM_EXIT_USAGE;
        }
    }
    if (!strcmp(cmd, "report")) {
        if (optind >= argc) mlm_fatal(MLM_EXIT_USAGE, "mlm report: give the run directory, e.g. mlm report runs/x");
    } else if (!ckpt) {
        mlm_fatal(MLM_EXIT_USAGE, "mlm %s: --ckpt PATH is required (a checkpoint in a run directory)", cmd);
    }
    (void)out;
    mlm_fatal(MLM_EXIT_FAILURE, "mlm %s is not implemented yet", cmd);
}

int main(int argc, char **argv) {
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
    // Each command parses its own options: shift argv so that getopt sees the command as argv[0].
    if (!strcmp(cmd, "train")) return cmd_train(argc - 1, argv + 1);
    if (!strcmp(cmd, "eval") || !strcmp(cmd, "fill") || !strcmp(cmd, "export") || !strcmp(cmd, "info") ||
        !strcmp(cmd, "report"))
        return cmd_other(cmd, argc - 1, argv + 1);
    fprintf(stderr, "mlm: unknown command '%s'\n\n", cmd);
    usage_main(stderr);
    return MLM_EXIT_USAGE;
}
