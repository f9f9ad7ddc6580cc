// curand_check.h: CURAND_CHECK, which stops with the call, file, line and cuRAND's status name.
#ifndef MLM_CURAND_CHECK_H
#define MLM_CURAND_CHECK_H

#include <curand.h>

#ifdef __cplusplus
extern "C" {
#endif

const char *mlm_curand_status_name(curandStatus_t s);
void mlm_curand_fail(curandStatus_t s, const char *call, const char *file, int line);

#define CURAND_CHECK(call)                                                       \
    do {                                                                         \
        curandStatus_t mlm_st_ = (call);                                         \
        if (mlm_st_ != CURAND_STATUS_SUCCESS) mlm_curand_fail(mlm_st_, #call, __FILE__, __LINE__); \
    } while (0)

#ifdef __cplusplus
}
#endif

#endif
