// input_files.h: the text inputs of `mlm prepare` and `mlm vocab`: files, directories (every regular file below
// them, in name order, hidden names skipped), - for standard input, and pipes; every file taken once, however many
// paths (links, a link back up the tree, an input named twice) lead to it.
#ifndef MLM_INPUT_FILES_H
#define MLM_INPUT_FILES_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const char *skip_dir;    // a directory to leave out wherever it is met (prepare's --out), or NULL
    const char *set_marker;  // leave out directories holding a file of this name (a shard set's manifest), or NULL
} InputRules;

typedef struct {
    char **paths;            // [n]; "-" is standard input
    unsigned char *stream;   // [n] 1: standard input or a pipe, which can be read once only
    size_t n, cap;
    // every (device, inode) taken or walked, an open-addressing set of pairs
    uint64_t *seen;
    size_t n_seen, cap_seen;
    // what was left out, for input_files_report
    size_t again, special, sets, unreadable;
    char first_special[512], first_set[512];
} InputFiles;

// Add one command-line input: "-"; a regular file; a pipe (a stream); a directory, walked. Exits with a message
// saying what to give instead for anything else (a device such as /dev/zero, a socket, a missing path), for "-"
// twice, for the skip_dir itself and for a directory holding a set_marker file given as an input.
void input_files_add(InputFiles *in, const char *arg, const InputRules *rules);
// One note on stderr per kind of thing left out (files met again through links, FIFOs or devices inside
// directories, shard sets, unreadable entries), prefixed with `cmd`; nothing when nothing was left out.
void input_files_report(const InputFiles *in, const char *cmd);
void input_files_free(InputFiles *in);

#ifdef __cplusplus
}
#endif
#endif
