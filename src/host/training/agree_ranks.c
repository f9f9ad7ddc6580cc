// agree_ranks.c: the ranks of a data-parallel `mlm train` agree on the configuration, the data, the backend and the
// starting state before they exchange anything else (agree_ranks.h; the exchange and the message are agree.c's).
#include "mlm/agree_ranks.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mlm/agree.h"
#include "mlm/common.h"

int train_key_per_rank(const char *key) {
    return !strcmp(key, "train.threads") || !strcmp(key, "data.path") || !strcmp(key, "train.device");
}

void train_agree_setup(const Dist *d, const Config *cfg, const char *data_md5, int gpu) {
    if (d->world > 1 && !d->mpi && d->rank == 0)
        mlm_warn("the %d ranks were started without mpirun (RANK / WORLD_SIZE), so nothing can compare their "
                 "configurations: start every rank with the same command line", d->world);
    if (d->world == 1 || !d->mpi) return;
    int nk = config_key_count(), n = 0;
    const char **names = mlm_malloc((size_t)(nk + 2) * sizeof(char *), "agreement keys");
    const char **values = mlm_malloc((size_t)(nk + 2) * sizeof(char *), "agreement values");
    char *text = mlm_malloc((size_t)(nk + 2) * CONFIG_VALUE_TEXT, "agreement texts");
    for (int i = 0; i < nk; i++) {
        if (train_key_per_rank(config_key_name(i))) continue;
        names[n] = config_key_name(i);
        config_value_text(cfg, i, text + (size_t)n * CONFIG_VALUE_TEXT, CONFIG_VALUE_TEXT);
        n++;
    }
    names[n] = "the data set's md5";
    snprintf(text + (size_t)n * CONFIG_VALUE_TEXT, CONFIG_VALUE_TEXT, "%s", data_md5);
    n++;
    names[n] = "the backend";
    snprintf(text + (size_t)n * CONFIG_VALUE_TEXT, CONFIG_VALUE_TEXT, "%s", gpu ? "cuda" : "cpu");
    n++;
    for (int i = 0; i < n; i++) values[i] = text + (size_t)i * CONFIG_VALUE_TEXT;
    dist_require_same(d, "configuration", "Start every rank with the same configuration file and --set options "
                      "(train.threads, train.device and data.path may differ; the data itself may not)", n, names,
                      values);
    free(names);
    free(values);
    free(text);
}

void train_agree_state(const Dist *d, long step, const float *params, const float *adam_m, const float *adam_v,
                       size_t n_params, const char *source) {
    if (d->world == 1 || !d->mpi) return;
    size_t bytes = n_params * sizeof(float);
    uint64_t h = agree_hash(params, bytes, (uint64_t)step);
    if (adam_m) h = agree_hash(adam_m, bytes, h);
    if (adam_v) h = agree_hash(adam_v, bytes, h);
    char value[128];
    snprintf(value, sizeof(value), "%s, step %ld, hash %016llx", source, step, (unsigned long long)h);
    const char *names[1] = {"the starting state"}, *values[1] = {value};
    dist_require_same(d, "starting state", "Resume every rank from the same checkpoint, or give every rank the same "
                      "--init weights", 1, names, values);
}
