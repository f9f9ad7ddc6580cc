// blas_id.h: what the CBLAS linked into this process IS (vendor, version, kernels, file), asked of the library
// that is actually loaded, never inferred from its name. Used by matmul.c at run time and by CMake's probe
// (cmake/blas_probe.c) at configure time, so both decide alike.
//
// Debian's alternatives make this necessary: libblas.so.3 may be OpenBLAS or netlib's reference BLAS
// (/usr/lib/<triplet>/blas/libblas.so.3), and which one changes with `update-alternatives`, so the name a
// build linked says nothing. Each optimized BLAS exports a vendor function the reference lacks; the file that
// provides cblas_sgemm is found with dladdr.
#ifndef MLM_CPU_BLAS_ID_H
#define MLM_CPU_BLAS_ID_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE  // dladdr
#endif
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

typedef struct {
    const char *vendor;  // "OpenBLAS", "BLIS", "MKL", or NULL: no optimized BLAS's vendor symbol is loaded
    char version[160];   // the vendor's own version or configuration string ("" when unknown)
    char core[64];       // OpenBLAS: the kernels it chose for this CPU (openblas_get_corename), else ""
    char file[512];      // the shared object that provides cblas_sgemm ("" when it is linked statically)
} BlasId;

static inline void blas_copy(char *dst, size_t n, const char *src) {
    snprintf(dst, n, "%s", src ? src : "");
    for (char *c = dst; *c; c++)
        if (*c == '\n') *c = ' ';
    size_t len = strlen(dst);
    while (len > 0 && dst[len - 1] == ' ') dst[--len] = '\0';
}

// Fills *id for this process. cblas_sgemm_address: the function the program calls (dladdr names the file that
// really provides it), or NULL. Vendor functions are looked up in that file and the libraries it depends on
// (Debian's OpenBLAS libblas.so.3 is a thin wrapper over libopenblas.so.0), not in the whole process: a
// process can hold OpenBLAS for another library's sake while its products go to a reference BLAS.
static inline void blas_identify(BlasId *id, void *cblas_sgemm_address) {
    memset(id, 0, sizeof(*id));
    Dl_info info;
    void *scope = RTLD_DEFAULT, *handle = NULL;
    if (cblas_sgemm_address && dladdr(cblas_sgemm_address, &info) && info.dli_fname) {
        blas_copy(id->file, sizeof(id->file), info.dli_fname);
        if ((handle = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD)) != NULL) scope = handle;
    }
    void *f;
    if ((f = dlsym(scope, "openblas_get_config")) != NULL) {
        id->vendor = "OpenBLAS";
        blas_copy(id->version, sizeof(id->version), ((char *(*)(void))f)());
        char *space = strchr(id->version, ' ');  // "OpenBLAS 0.3.21 DYNAMIC_ARCH ...": the name and version
        if (space && (space = strchr(space + 1, ' ')) != NULL) *space = '\0';
        if ((f = dlsym(scope, "openblas_get_corename")) != NULL)
            blas_copy(id->core, sizeof(id->core), ((char *(*)(void))f)());
    } else if ((f = dlsym(scope, "bli_info_get_version_str")) != NULL) {
        id->vendor = "BLIS";
        blas_copy(id->version, sizeof(id->version), ((const char *(*)(void))f)());
    } else if ((f = dlsym(scope, "MKL_Get_Version_String")) != NULL) {
        id->vendor = "MKL";
        char buf[160];
        ((void (*)(char *, int))f)(buf, (int)sizeof(buf));
        buf[sizeof(buf) - 1] = '\0';
        blas_copy(id->version, sizeof(id->version), buf);
    }
    if (handle) dlclose(handle);
}

#endif
