// test_data_trust.c: a shard set is trusted only once every byte of it is verified, by the commands a user runs
// (issue 22: bugs 1, 3, 4 and its "Done when"):
//   - corrupting any byte of a set (sampled, seeded positions of every shard, the manifest and vocab.txt; the
//     first and last byte of each) is refused by `mlm train`, `mlm eval` and `mlm train --resume`, each naming the
//     file, and no checkpoint is written;
//   - a run verifies its set once: --resume says it was verified earlier; a shard changed in place since (and
//     changed back) is verified again, and refused while it is damaged;
//   - a token id outside the vocabulary under valid checksums (a crafted or buggy writer) is refused when the set is
//     opened, with the shard, the token and its byte offset (it trained to step 800 and died there);
//   - a shard of another set with the same vocabulary and counts copied over one of the set's is refused (the
//     resume went on over the other text);
//   - a set of format version 1 is refused with the command that makes it again, and a run checkpointed on it
//     resumes once that command has run (the new manifest records the old identity, the shards being the same).
// Usage: test_data_trust MLM CORPUS (label data; about 20 s).
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mlm/checkpoint.h"
#include "mlm/common.h"
#include "mlm/data.h"
#include "mlm/shards.h"
#include "test_util.h"

static const char *mlm;
static char tmp[256];
static const char *const TINY =
    "--set model.n_layers=1 --set model.d_model=16 --set model.n_heads=2 --set model.d_ff=16 --set data.seq_len=16 "
    "--set train.batch_size=4 --set train.threads=2 --set train.samples=false --device cpu -q";

#define log_has test_file_contains

static uint64_t rng_state = 0x2207;
static uint64_t next_rand(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void flip(const char *path, long at, unsigned char x) {
    FILE *f = fopen(path, "r+b");
    CHECK(f != NULL, "cannot open %s", path);
    if (!f) return;
    fseek(f, at, SEEK_SET);
    int c = fgetc(f);
    fseek(f, at, SEEK_SET);
    fputc(c ^ x, f);
    fclose(f);
}

static long file_size(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? (long)st.st_size : -1;
}

// The corruption sweep over the copy `c` of the set the run `run` trained on.
static void sweep(const char *set, const char *run) {
    char c[400], err[2048];
    snprintf(c, sizeof(c), "%s/copy", tmp);
    test_run("rm -rf %s && cp -r %s %s", c, set, c);
    Manifest m;
    if (manifest_read(&m, c, err, sizeof(err))) {
        CHECK(0, "%s", err);
        return;
    }
    // Every file of the set: shards, manifest, vocab.txt.
    char files[64][1400], names[64][600];
    int n = 0;
    for (int i = 0; i < m.n_shards && n < 62; i++, n++) {
        manifest_shard_path(&m, &m.shards[i], files[n], sizeof(files[n]));
        snprintf(names[n], sizeof(names[n]), "%s/%s", m.shard_dir, m.shards[i].file);
    }
    snprintf(files[n], sizeof(files[n]), "%s/manifest.txt", c);
    snprintf(names[n++], sizeof(names[0]), "manifest.txt");
    snprintf(files[n], sizeof(files[n]), "%s", m.vocab);
    snprintf(names[n++], sizeof(names[0]), "vocab.txt");
    manifest_free(&m);
    int tried = 0, refused[3] = {0, 0, 0};
    char log[400], ckpt3[500];
    snprintf(log, sizeof(log), "%s/sweep.log", tmp);
    snprintf(ckpt3, sizeof(ckpt3), "%s/checkpoints/ckpt-00000003.safetensors", run);
    for (int f = 0; f < n; f++) {
        long size = file_size(files[f]);
        int positions = strstr(names[f], ".bin") ? 3 : 6;
        for (int k = 0; k < positions; k++) {
            long at = k == 0 ? 0 : k == 1 ? size - 1 : (long)(next_rand() % (uint64_t)size);
            unsigned char x = (unsigned char)(1 + next_rand() % 255);
            flip(files[f], at, x);
            tried++;
            static const char *const what[3] = {"train", "eval", "--resume"};
            for (int cmd = 0; cmd < 3; cmd++) {
                int rc;
                if (cmd == 0)
                    rc = test_run("%s train --set data.path=%s %s --steps 1 -o %s/fresh > %s 2>&1", mlm, c, TINY, tmp, log);
                else if (cmd == 1)
                    rc = test_run("%s eval --ckpt %s --data %s --split all > %s 2>&1", mlm, run, c, log);
                else
                    rc = test_run("%s train --resume %s --set data.path=%s --steps 3 -q > %s 2>&1", mlm, run, c, log);
                int ok = rc != 0 && log_has(log, names[f]) && access(ckpt3, F_OK) != 0;
                refused[cmd] += ok;
                if (!ok) {
                    char shown[600] = "";
                    size_t len;
                    char *t = mlm_read_file(log, &len);
                    if (t) snprintf(shown, sizeof(shown), "%s", t);
                    free(t);
                    CHECK(0, "%s: byte %ld of %s xor 0x%02x: exit %d, the message does not name %s: %s", what[cmd], at,
                          names[f], x, rc, names[f], shown);
                }
            }
            flip(files[f], at, x);  // back to the original bytes
        }
    }
    printf("sweep: %d corruptions over %d files; refused naming the file by train %d, eval %d, --resume %d\n", tried, n,
           refused[0], refused[1], refused[2]);
    CHECK(tried > 0 && refused[0] == tried && refused[1] == tried && refused[2] == tried, "every corruption refused");
    // The copy, restored, is accepted again (the refusals were about the bytes, not the copy).
    CHECK(test_run("%s eval --ckpt %s --data %s --split all > %s 2>&1", mlm, run, c, log) == 0, "the restored copy evaluates");
}

// A resumed run does not read the set again unless its files changed; a damaged file is caught whatever the stamp.
static void stamp(const char *set, const char *run) {
    char log[400], err[2048], shard[1400];
    snprintf(log, sizeof(log), "%s/stamp.log", tmp);
    // The run stamped the files that were older than 2 s when it verified them; the set was prepared just before,
    // so this resume reads it again and stamps it, and the next one reads nothing.
    CHECK(test_run("%s train --resume %s --steps 3 > %s 2>&1", mlm, run, log) == 0, "--resume");
    CHECK(test_run("%s train --resume %s --steps 4 > %s 2>&1", mlm, run, log) == 0 && log_has(log, "verified earlier in this run"),
          "--resume: the set was verified earlier in this run, not read again");
    Manifest m;
    if (manifest_read(&m, set, err, sizeof(err))) return;
    manifest_shard_path(&m, &m.shards[0], shard, sizeof(shard));
    manifest_free(&m);
    flip(shard, 300, 0x10);
    CHECK(test_run("%s train --resume %s --steps 5 > %s 2>&1", mlm, run, log) == 1 && log_has(log, "fails its checksum"),
          "a shard damaged in place after the run verified it: refused on --resume despite the stamp");
    flip(shard, 300, 0x10);
    CHECK(test_run("%s train --resume %s --steps 5 > %s 2>&1", mlm, run, log) == 0 &&
          log_has(log, "verified (checksums and token ids)"), "changed back: verified again (its times changed), and resumed");
}

// Token i of shard entry `e` of the set at dir rewritten to `id` with every checksum valid (what a crafted file or
// a buggy writer leaves), the manifest rewritten to match.
static void craft_token(const char *dir, int e, uint64_t i, uint32_t id) {
    Manifest m;
    char err[2048], path[1400];
    if (manifest_read(&m, dir, err, sizeof(err))) {
        CHECK(0, "%s", err);
        return;
    }
    manifest_shard_path(&m, &m.shards[e], path, sizeof(path));
    m.shards[e].payload_hash = test_shard_set_token(path, i, id);
    CHECK(manifest_write(&m, err, sizeof(err)) == 0, "%s", err);
    manifest_free(&m);
}

static void out_of_range_id(const char *set, const char *run) {
    char c[400], log[400];
    snprintf(c, sizeof(c), "%s/oor", tmp);
    snprintf(log, sizeof(log), "%s/oor.log", tmp);
    test_run("rm -rf %s && cp -r %s %s", c, set, c);
    craft_token(c, 1, 187, 300);  // the vocabulary has 300 ids
    const char *want = "token 187 (byte offset 446) is id 300, outside the vocabulary of 300 ids";
    int rc = test_run("%s train --set data.path=%s %s --steps 1 -o %s/oor-run > %s 2>&1", mlm, c, TINY, tmp, log);
    CHECK(rc == 1 && log_has(log, "train-00001.bin") && log_has(log, want), "train: the id refused at open, naming the "
          "shard and offset (exit %d)", rc);
    rc = test_run("%s train --resume %s --set data.path=%s --steps 3 > %s 2>&1", mlm, run, c, log);
    CHECK(rc == 1 && log_has(log, want), "--resume: refused the same way (exit %d)", rc);
    rc = test_run("%s eval --ckpt %s --data %s --split all > %s 2>&1", mlm, run, c, log);
    CHECK(rc == 1 && log_has(log, want), "eval: refused the same way (exit %d)", rc);
}

// Byte sets of two texts of the same shape: the same counts in every shard, other tokens.
static void identity(const char *a_set, const char *b_set, const char *run_a) {
    char c[400], log[400], err[2048], from[1400], to[1400];
    snprintf(c, sizeof(c), "%s/mixed", tmp);
    snprintf(log, sizeof(log), "%s/mixed.log", tmp);
    test_run("rm -rf %s && cp -r %s %s", c, a_set, c);
    Manifest a, b;
    if (manifest_read(&a, c, err, sizeof(err)) || manifest_read(&b, b_set, err, sizeof(err))) {
        CHECK(0, "%s", err);
        return;
    }
    CHECK(a.shards[0].n_tokens == b.shards[0].n_tokens && a.shards[0].n_docs == b.shards[0].n_docs &&
          a.shards[0].payload_hash != b.shards[0].payload_hash, "two sets with the same counts and other tokens");
    manifest_shard_path(&b, &b.shards[0], from, sizeof(from));
    manifest_shard_path(&a, &a.shards[0], to, sizeof(to));
    test_run("cp %s %s", from, to);
    int rc = test_run("%s train --resume %s --set data.path=%s --steps 3 > %s 2>&1", mlm, run_a, c, log);
    CHECK(rc == 1 && log_has(log, "train-00000.bin") && log_has(log, "payload hash"),
          "--resume over a shard of the other set: refused (exit %d; it went on over the other text)", rc);
    rc = test_run("%s train --set data.path=%s %s --steps 1 -o %s/mixed-run > %s 2>&1", mlm, c, TINY, tmp, log);
    CHECK(rc == 1 && log_has(log, "payload hash"), "train: refused (exit %d)", rc);
    rc = test_run("%s eval --ckpt %s --data %s --split all > %s 2>&1", mlm, run_a, c, log);
    CHECK(rc != 0 && log_has(log, "payload hash"), "eval: refused (exit %d)", rc);
    manifest_free(&a);
    manifest_free(&b);
}

// Format version 1: the set is refused with the command that makes it again; a run checkpointed on it resumes on
// the set that command makes (same shards, so the manifest records the old identity).
static void version1(const char *a_set, const char *a_text, const char *run_a) {
    char v1[400], run[400], log[400], err[2048], path[1400];
    snprintf(v1, sizeof(v1), "%s/v1set", tmp);
    snprintf(run, sizeof(run), "%s/v1run", tmp);
    snprintf(log, sizeof(log), "%s/v1.log", tmp);
    Manifest a;
    if (manifest_read(&a, a_set, err, sizeof(err))) {
        CHECK(0, "%s", err);
        return;
    }
    // The layout and manifest version 1 wrote: shards in the set's directory, no hashes, no checksum.
    test_run("rm -rf %s %s && mkdir -p %s && cp %s/%s/*.bin %s/", v1, run, v1, a_set, a.shard_dir, v1);
    snprintf(path, sizeof(path), "%s/manifest.txt", v1);
    FILE *f = fopen(path, "w");
    fprintf(f, "# mlm shard set, written by mlm prepare 0.1.0; train with --set data.path=%s\nformat = mlm-shards\n"
            "version = 1\ntokenizer = byte\nvocab = bytes\nvocab_md5 = %s\nvocab_size = 261\nlowercase = 0\n"
            "documents = blank\ntoken_bytes = 2\nseed = 1234\nvalid_fraction = 0.20000000000000001\npad_id = 256\n"
            "mask_id = 260\nunk_id = 257\ncls_id = 258\nsep_id = 259\ntrain_docs = %" PRIu64 "\nvalid_docs = %" PRIu64
            "\ntrain_tokens = %" PRIu64 "\nvalid_tokens = %" PRIu64 "\nsource_bytes = %" PRIu64 "\n", v1, a.vocab_md5,
            a.train_docs, a.valid_docs, a.train_tokens, a.valid_tokens, a.source_bytes);
    for (int i = 0; i < a.n_shards; i++)
        fprintf(f, "shard = %s %s %" PRIu64 " %" PRIu64 "\n", a.shards[i].split, a.shards[i].file, a.shards[i].n_tokens,
                a.shards[i].n_docs);
    fclose(f);
    manifest_free(&a);
    char v1md5[33];
    CHECK(data_md5_file(path, v1md5) == 0, "md5");
    // A checkpoint of a run that trained on the version-1 set (as an earlier mlm wrote it: its identity).
    Checkpoint ck;
    if (ckpt_load(run_a, &ck, err, sizeof(err))) {
        CHECK(0, "%s", err);
        return;
    }
    memcpy(ck.corpus_md5, v1md5, 33);
    snprintf(ck.cfg.data_path, sizeof(ck.cfg.data_path), "%s", v1);
    mkdir(run, 0755);
    CHECK(ckpt_save(run, &ck, 3, NULL, 0, err, sizeof(err)) == 0, "%s", err);
    long step = ck.st.step;
    ckpt_free(&ck);
    int rc = test_run("%s train --resume %s --steps %ld > %s 2>&1", mlm, run, step + 1, log);
    char want[600];
    snprintf(want, sizeof(want), "mlm prepare --force --out %s --tokenizer byte --documents blank --valid-fraction 0.2", v1);
    CHECK(rc == 1 && log_has(log, "version 1") && log_has(log, want), "a version-1 set: refused with the command that "
          "makes it again (exit %d)", rc);
    // The command it gives, with the text.
    rc = test_run("%s prepare --force --out %s --tokenizer byte --documents blank --valid-fraction 0.20000000000000001 "
                  "--seed 1234 %s > %s 2>&1", mlm, v1, a_text, log);
    char flat[500];
    snprintf(flat, sizeof(flat), "%s/train-00000.bin", v1);
    CHECK(rc == 0 && log_has(log, "the same shards as the set it replaced") && access(flat, F_OK) != 0,
          "prepared again: the same shards, the old files gone (exit %d)", rc);
    Manifest now;
    CHECK(manifest_read(&now, v1, err, sizeof(err)) == 0 && !strcmp(now.replaces, v1md5), "replaces = the old identity");
    manifest_free(&now);
    rc = test_run("%s train --resume %s --steps %ld > %s 2>&1", mlm, run, step + 1, log);
    CHECK(rc == 0, "the run checkpointed on the version-1 set resumes on the new one (exit %d)", rc);
    // A set of another text prepared over it does not carry the identity: that run is refused, saying why.
    rc = test_run("%s prepare -q --force --out %s --tokenizer byte --documents blank %s/b.txt && "
                  "%s train --resume %s --steps %ld > %s 2>&1", mlm, v1, tmp, mlm, run, step + 2, log);
    CHECK(rc == 2 && log_has(log, "is not the one this run trained on"), "another text: refused (exit %d)", rc);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: test_data_trust MLM CORPUS\n");
        return 2;
    }
    mlm = argv[1];
    if (access(argv[2], R_OK) != 0) return test_skip("the corpus is missing");
    setenv("OMP_WAIT_POLICY", "passive", 0);  // mlm then starts once (it re-executes itself to set it otherwise)
    // tmpfs where there is one: prepare and training fsync every file they write.
    snprintf(tmp, sizeof(tmp), "%s/mlm_test_data_trust_%d", access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp",
             (int)getpid());
    test_run("rm -rf %s && mkdir -p %s", tmp, tmp);
    char set[400], run[400], a_text[400];
    snprintf(set, sizeof(set), "%s/wp", tmp);
    snprintf(run, sizeof(run), "%s/run", tmp);
    snprintf(a_text, sizeof(a_text), "%s/a.txt", tmp);
    // A WordPiece set of several shards and a run over it, then byte sets of two texts of the same shape.
    CHECK(test_run("head -c 20000 %s > %s && %s vocab -q --size 300 --out %s/vocab.txt %s && %s prepare -q -t wordpiece "
                   "--vocab %s/vocab.txt --documents blank --valid-fraction 0.2 --shard-tokens 1500 --out %s %s", argv[2],
                   a_text, mlm, tmp, a_text, mlm, tmp, set, a_text) == 0, "prepare");
    CHECK(test_run("%s train --set data.path=%s %s --set train.ckpt_every=1 --steps 2 -o %s > %s/run.log 2>&1", mlm, set,
                   TINY, run, tmp) == 0, "the run (see %s/run.log)", tmp);
    if (t_failures) return test_finish("test_data_trust");
    sweep(set, run);
    out_of_range_id(set, run);
    stamp(set, run);
    char a[400], b[400], run_a[400];
    snprintf(a, sizeof(a), "%s/bytes-a", tmp);
    snprintf(b, sizeof(b), "%s/bytes-b", tmp);
    snprintf(run_a, sizeof(run_a), "%s/run-a", tmp);
    CHECK(test_run("tr 'a-zA-Z' 'n-za-mN-ZA-M' < %s > %s/b.txt && %s prepare -q -t byte --documents blank --valid-fraction "
                   "0.2 --out %s %s && %s prepare -q -t byte --documents blank --valid-fraction 0.2 --out %s %s/b.txt && "
                   "%s train --set data.path=%s %s --set train.ckpt_every=1 --steps 2 -o %s > %s/run-a.log 2>&1", a_text,
                   tmp, mlm, a, a_text, mlm, b, tmp, mlm, a, TINY, run_a, tmp) == 0, "byte sets and a run");
    identity(a, b, run_a);
    version1(a, a_text, run_a);
    if (!t_failures) test_run("rm -rf %s", tmp);
    return test_finish("test_data_trust");
}
