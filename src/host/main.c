// main.c: the `mlm` command line: dispatch to train, eval, fill, export, info and report.
#include <stdio.h>
#include <string.h>

#include "mlm/common.h"

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--version") == 0) {
        printf("mlm %s\n", MLM_VERSION);
        return 0;
    }
    fprintf(stderr, "mlm: not yet implemented\n");
    return MLM_EXIT_USAGE;
}
