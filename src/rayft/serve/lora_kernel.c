/* Batched LoRA on CPU: out[v] += (x[v] @ A) @ B for every vector v of the rows each adapter serves.
 *
 * Built by kernel.py on first use (cc -O3 -march=native -fopenmp) and called through ctypes with
 * the fp32 tensors' data pointers. A work item is up to ITEM_ROWS rows of one adapter; an adapter's
 * A (in x rank) and B (rank x out) stream from memory once per item and stay in cache for the
 * item's other rows, where per-row stacks read them once per row. OpenMP here and in torch share
 * one runtime (both load libgomp.so.1), so the kernel uses torch's threads, not a second team.
 */
#include <stdint.h>
#include <string.h>

#define ITEM_FIELDS 8  /* a_ptr, b_ptr, rank, count, then ITEM_ROWS row indices: as BatchLoRA._plan (lora.py) */
#define ITEM_ROWS 4     /* as kernel.ITEM_ROWS */
#define MAX_RANK 1024

/* NV vectors at once: h = x @ A, then o += h @ B. RANK and NV are constants so that h and the
 * outputs stay in registers; each weight loaded serves all NV vectors, and the NV sums (or, for
 * one vector, four partial sums) let consecutive multiply-adds run without waiting on each other. */
#define DEFINE_BLOCK(RANK, NV)                                                                           \
    static void block_##RANK##_##NV(const float *const *x, float *const *o, const float *restrict a,    \
                                    const float *restrict b, int64_t in, int64_t outdim) {              \
        enum { P = NV == 1 ? 4 : 1 }; /* partial sums per vector */                                     \
        float h[NV][P][RANK];                                                                            \
        memset(h, 0, sizeof h);                                                                          \
        int64_t i = 0;                                                                                   \
        for (; i + P <= in; i += P) {                                                                    \
            for (int p = 0; p < P; p++) {                                                                \
                const float *restrict ai = a + (i + p) * RANK;                                           \
                for (int v = 0; v < NV; v++) {                                                           \
                    const float xi = x[v][i + p];                                                        \
                    _Pragma("omp simd") for (int j = 0; j < RANK; j++) h[v][p][j] += xi * ai[j];         \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
        for (; i < in; i++)                                                                              \
            for (int v = 0; v < NV; v++) {                                                               \
                const float xi = x[v][i];                                                                \
                _Pragma("omp simd") for (int j = 0; j < RANK; j++) h[v][0][j] += xi * a[i * RANK + j];   \
            }                                                                                            \
        for (int v = 0; v < NV; v++)                                                                     \
            for (int p = 1; p < P; p++)                                                                  \
                _Pragma("omp simd") for (int j = 0; j < RANK; j++) h[v][0][j] += h[v][p][j];             \
        int64_t c = 0;                                                                                   \
        for (; c + 16 <= outdim; c += 16) { /* 16 outputs at a time: each output written once */        \
            float acc[NV][16];                                                                           \
            for (int v = 0; v < NV; v++) memcpy(acc[v], o[v] + c, sizeof acc[v]);                        \
            for (int j = 0; j < RANK; j++) {                                                             \
                const float *restrict bj = b + j * outdim + c;                                           \
                for (int v = 0; v < NV; v++) {                                                           \
                    const float hj = h[v][0][j];                                                         \
                    _Pragma("omp simd") for (int e = 0; e < 16; e++) acc[v][e] += hj * bj[e];            \
                }                                                                                        \
            }                                                                                            \
            for (int v = 0; v < NV; v++) memcpy(o[v] + c, acc[v], sizeof acc[v]);                        \
        }                                                                                                \
        for (; c < outdim; c++)                                                                          \
            for (int v = 0; v < NV; v++) {                                                               \
                float s = o[v][c];                                                                       \
                for (int j = 0; j < RANK; j++) s += h[v][0][j] * b[j * outdim + c];                      \
                o[v][c] = s;                                                                             \
            }                                                                                            \
    }
#define DEFINE_RANK(RANK) DEFINE_BLOCK(RANK, 1) DEFINE_BLOCK(RANK, 4)
DEFINE_RANK(4)
DEFINE_RANK(8)
DEFINE_RANK(16)
DEFINE_RANK(32)
DEFINE_RANK(64)

static void block_any(const float *const *x, float *const *o, const float *a, const float *b, int64_t in,
                      int64_t outdim, int64_t rank, int nv) {
    for (int v = 0; v < nv; v++) {
        float h[MAX_RANK] = {0};
        for (int64_t i = 0; i < in; i++)
            for (int64_t j = 0; j < rank; j++) h[j] += x[v][i] * a[i * rank + j];
        for (int64_t j = 0; j < rank; j++)
            for (int64_t c = 0; c < outdim; c++) o[v][c] += h[j] * b[j * outdim + c];
    }
}

#define CASE_RANK(RANK)                                                          \
    case RANK:                                                                   \
        if (nv == 4) block_##RANK##_4(x, o, a, b, in, outdim);                   \
        else for (int v = 0; v < nv; v++) block_##RANK##_1(x + v, o + v, a, b, in, outdim); \
        break;

static void run_block(const float *const *x, float *const *o, const float *a, const float *b, int64_t in,
                      int64_t outdim, int64_t rank, int nv) {
    switch (rank) {
        CASE_RANK(4)
        CASE_RANK(8)
        CASE_RANK(16)
        CASE_RANK(32)
        CASE_RANK(64)
        default: block_any(x, o, a, b, in, outdim, rank, nv);
    }
}

/* An item's vectors (its rows' tokens), four at a time. */
static void run_item(const float *x, float *out, int64_t tokens, int64_t in, int64_t outdim, const int64_t *item) {
    const float *a = (const float *)(intptr_t)item[0];
    const float *b = (const float *)(intptr_t)item[1];
    const int64_t rank = item[2], vectors = item[3] * tokens;
    const float *xv[4];
    float *ov[4];
    int nv = 0;
    for (int64_t n = 0; n < vectors; n++) {
        const int64_t at = item[4 + n / tokens] * tokens + n % tokens;
        xv[nv] = x + at * in;
        ov[nv] = out + at * outdim;
        if (++nv == 4 || n == vectors - 1) {
            run_block(xv, ov, a, b, in, outdim, rank, nv);
            nv = 0;
        }
    }
}

/* x: rows x tokens x in, out: rows x tokens x outdim (both contiguous fp32); items: n_items x ITEM_FIELDS,
 * no row in two items. */
void lora_add(const float *x, float *out, int64_t tokens, int64_t in, int64_t outdim, const int64_t *items,
                 int64_t n_items) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t n = 0; n < n_items; n++) run_item(x, out, tokens, in, outdim, items + n * ITEM_FIELDS);
}
