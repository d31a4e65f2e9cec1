/* One GPT decode step for one sequence on the CPU: token in, logits out, the KV cache appended.
 *
 * Built and called by gpt2lab/native_decode.py, which checks every shape, dtype and pointer before
 * a step; nothing here validates its input. The step is what GPT.forward (model.py) computes for one
 * token, written as one function over the weights where they lie, so that a token costs the weight
 * reads and little else: one OpenMP parallel region per token (torch's own OpenMP runtime, already
 * loaded, with torch's thread count), each matrix-vector product split by rows between the threads,
 * barriers between the stages.
 *
 * Precision follows the torch forward it stands in for:
 *   - float32 model: everything float32.
 *   - bfloat16 model: every tensor torch would store is rounded to bfloat16 at the same place
 *     (linear and LayerNorm outputs, q/k/v, attention output, the residual stream, logits); sums
 *     accumulate in float32, as torch's kernels do.
 *   - int8 model (gpt2lab.int8): a float32 model whose linear layers take bfloat16-rounded inputs,
 *     multiply by int8 rows times a bfloat16 scale and round the product to bfloat16 before the
 *     float32 bias (torch._weight_int8pack_mm's contract); the products are integer ones over the
 *     input rounded to 16 bits (split_input).
 * Compiled with -march=native: the AVX2/FMA and AVX-512 (BF16, VNNI) paths below run where the CPU
 * has them, plain loops (vectorized by the compiler through `omp simd`) elsewhere.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

enum { W_F32 = 0, W_BF16 = 1, W_INT8 = 2 };

/* --- bfloat16 ---------------------------------------------------------------------------------- */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN kept NaN (torch's rule) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* A tensor of the activation dtype (float32 or bfloat16) read as float. */
static inline float load_act(const void* p, long i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

/* --- exp and tanh, vectorizable (the libm ones are scalar calls) --------------------------------- */

static inline float exp_approx(float x) { /* |relative error| < 2e-7 on [-87, 88] */
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = nearbyintf(x * 1.44269504f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.166666672f + r * (0.0416666418f + r * (0.00833336543f
                + r * (0.00138889183f + r * 0.000198393397f))))));
    int32_t e = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &e, 4);
    return p * s;
}

static inline float gelu_tanh(float x) { /* 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
    float u = 0.7978845608f * (x + 0.044715f * x * x * x);
    float t = 1.0f - 2.0f / (exp_approx(2.0f * u) + 1.0f);
    return 0.5f * x * (1.0f + t);
}

/* --- matrix-vector products: y[r] = W[r] . x for rows [r0, r1) of W (N, K), row-major -------------
 * One row at a time, front to back: the weights are read as one sequential stream, which the
 * hardware prefetcher follows at close to the memory's bandwidth (several rows interleaved read
 * ~25% slower on a Zen 4). */

/* float32 weights, with 256-bit FMAs even where AVX-512 is there: on a Zen 4 they streamed the weights
 * 4-8% faster than 512-bit ones (as fast as a plain read), and they run on AVX2 machines too */
static void rows_f32(const float* W, const float* x, float* y, long K, long r0, long r1) {
    long r = r0;
#if defined(__AVX2__) && defined(__FMA__)
    if (K % 8 == 0) {
        long K32 = K / 32 * 32;
        for (; r < r1; r++) {
            const float* w = W + r * K;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            long k = 0;
            for (; k < K32; k += 32) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
            }
            for (; k < K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
            __m256 sum = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            y[r] = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
        }
    }
#endif
    for (; r < r1; r++) {
        const float* w = W + r * K;
        float a = 0;
#pragma omp simd reduction(+ : a)
        for (long k = 0; k < K; k++) a += w[k] * x[k];
        y[r] = a;
    }
}

/* bfloat16 weights; xb is x as bfloat16 (the values torch's bfloat16 linear reads) */
static void rows_bf16(const uint16_t* W, const uint16_t* xb, float* y, long K, long r0, long r1) {
    long r = r0;
#if defined(__AVX512BF16__)
    if (K % 32 == 0) {
        long K128 = K / 128 * 128;
        for (; r < r1; r++) {
            const uint16_t* w = W + r * K;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            long k = 0;
#define DOT(acc, o) acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w + k + o), \
                                           (__m512bh)_mm512_loadu_si512(xb + k + o))
            for (; k < K128; k += 128) {
                DOT(a0, 0); DOT(a1, 32); DOT(a2, 64); DOT(a3, 96);
            }
            for (; k < K; k += 32) DOT(a0, 0);
#undef DOT
            y[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        }
    }
#endif
    for (; r < r1; r++) {
        const uint16_t* w = W + r * K;
        float a = 0;
#pragma omp simd reduction(+ : a)
        for (long k = 0; k < K; k++) a += bf16_to_f32(w[k]) * bf16_to_f32(xb[k]);
        y[r] = a;
    }
}

/* An int8 layer's input, split for integer dot products: x ~= scale * (256 hi + lo) with hi int8,
 * lo uint8, i.e. x rounded to 16 bits against its largest element (error <= max|x| / 65534 per
 * element, far below the bfloat16 rounding the input already had). */
typedef struct {
    const float* x;  /* bfloat16-rounded values */
    const int8_t* hi;
    const uint8_t* lo;
    float scale;     /* NaN when x holds a NaN, so the outputs are NaN as torch's would be */
    float hi_sum;    /* sum of hi */
} Int8Input;

static void split_input(const float* x, long K, int8_t* hi, uint8_t* lo, Int8Input* in) {
    float top = 0;
    int nan = 0;
    for (long k = 0; k < K; k++) {
        float a = fabsf(x[k]);
        top = a > top ? a : top;
        nan |= x[k] != x[k];
    }
    float scale = top > 0 ? top / 32767.0f : 1.0f;
    long hs = 0;
    for (long k = 0; k < K; k++) {
        int32_t q = nan ? 0 : (int32_t)nearbyintf(x[k] / scale);
        hi[k] = (int8_t)(q >> 8); /* arithmetic shift: q = 256 hi + lo */
        lo[k] = (uint8_t)(q & 0xff);
        hs += hi[k];
    }
    in->x = x; in->hi = hi; in->lo = lo;
    in->scale = nan ? NAN : scale;
    in->hi_sum = (float)hs;
}

/* int8 weights: y[r] = sum_k W[r,k] x[k] (before the row's scale) */
static void rows_int8(const int8_t* W, const Int8Input* in, float* y, long K, long r0, long r1) {
    long r = r0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    /* dpbusd multiplies unsigned by signed bytes: hi (signed) against w + 128 (w xor 0x80, unsigned),
     * minus 128 sum(hi); lo (unsigned) against w. Both sums fit int32 for K < 65536. */
    if (K % 64 == 0 && K < 65536) {
        const __m512i flip = _mm512_set1_epi8((char)0x80);
        for (; r < r1; r++) {
            const int8_t* w = W + r * K;
            __m512i h0 = _mm512_setzero_si512(), h1 = h0, l0 = h0, l1 = h0;
            long k = 0;
            for (; k + 128 <= K; k += 128) {
                __m512i wa = _mm512_loadu_si512(w + k), wb = _mm512_loadu_si512(w + k + 64);
                h0 = _mm512_dpbusd_epi32(h0, _mm512_xor_si512(wa, flip), _mm512_loadu_si512(in->hi + k));
                l0 = _mm512_dpbusd_epi32(l0, _mm512_loadu_si512(in->lo + k), wa);
                h1 = _mm512_dpbusd_epi32(h1, _mm512_xor_si512(wb, flip), _mm512_loadu_si512(in->hi + k + 64));
                l1 = _mm512_dpbusd_epi32(l1, _mm512_loadu_si512(in->lo + k + 64), wb);
            }
            for (; k < K; k += 64) {
                __m512i wa = _mm512_loadu_si512(w + k);
                h0 = _mm512_dpbusd_epi32(h0, _mm512_xor_si512(wa, flip), _mm512_loadu_si512(in->hi + k));
                l0 = _mm512_dpbusd_epi32(l0, _mm512_loadu_si512(in->lo + k), wa);
            }
            float hi = (float)_mm512_reduce_add_epi32(_mm512_add_epi32(h0, h1)) - 128.0f * in->hi_sum;
            float lo = (float)_mm512_reduce_add_epi32(_mm512_add_epi32(l0, l1));
            y[r] = (256.0f * hi + lo) * in->scale;
        }
        return;
    }
#endif
    for (; r < r1; r++) {
        const int8_t* w = W + r * K;
        float a = 0;
#pragma omp simd reduction(+ : a)
        for (long k = 0; k < K; k++) a += (float)w[k] * in->x[k];
        y[r] = a;
    }
}

/* --- the model --------------------------------------------------------------------------------- */

typedef struct {
    const void* weight; /* (N, K): float, bfloat16 or int8 */
    const void* bias;   /* (N,) activation dtype (int8: float32), or NULL */
    const void* scale;  /* (N,) bfloat16, int8 only */
} Linear;

typedef struct {
    long n_layer, n_embd, n_head, n_kv_head, head_size, n_ffn, vocab;
    int wkind, act_bf16, learned_pos, rope;
    float eps, attn_scale;
} Config;

/* The activations a step works in (float32), allocated by the caller. */
typedef struct {
    float *x, *xn, *qkv, *att, *h, *out, *scores;
    uint16_t* xb;   /* a linear layer's input as bfloat16 (bfloat16 weights) */
    int8_t* xhi;    /* ... split for int8 weights (split_input) */
    uint8_t* xlo;
    Int8Input in8;
} Scratch;

/* Rows [r0, r1) of this thread's share of N rows (blocks of 16 rows: whole cache lines of y). */
static void my_rows(long N, long* r0, long* r1) {
    long nt = omp_get_num_threads(), t = omp_get_thread_num();
    long chunk = ((N + nt - 1) / nt + 15) / 16 * 16;
    *r0 = t * chunk < N ? t * chunk : N;
    *r1 = *r0 + chunk < N ? *r0 + chunk : N;
}

/* y = act(x W^T + b) for this thread's rows, rounded as torch would store it. gelu: apply GELU.
 * The input x (float) must already be prepared by prepare_input on every thread's behalf. */
static void linear_rows(const Config* c, const Linear* L, const Scratch* s, const float* x, float* y,
                        long N, long K, int gelu) {
    long r0, r1;
    my_rows(N, &r0, &r1);
    if (r0 >= r1) return;
    if (c->wkind == W_F32) rows_f32((const float*)L->weight, x, y, K, r0, r1);
    else if (c->wkind == W_BF16) rows_bf16((const uint16_t*)L->weight, s->xb, y, K, r0, r1);
    else rows_int8((const int8_t*)L->weight, &s->in8, y, K, r0, r1);
    for (long r = r0; r < r1; r++) {
        float v = y[r];
        if (c->wkind == W_INT8) {
            v = round_bf16(v * bf16_to_f32(((const uint16_t*)L->scale)[r]));
            if (L->bias) v += ((const float*)L->bias)[r];
        } else {
            if (L->bias) v += load_act(L->bias, r, c->act_bf16);
            if (c->act_bf16) v = round_bf16(v);
        }
        if (gelu) {
            v = gelu_tanh(v);
            if (c->act_bf16) v = round_bf16(v);
        }
        y[r] = v;
    }
}

/* Make x (K,) ready for a linear layer (one thread): bfloat16 weights read it as bfloat16, int8
 * ones as bfloat16-rounded values, split for integer products. */
static void prepare_input(const Config* c, Scratch* s, float* x, long K) {
    if (c->wkind == W_BF16) {
        for (long k = 0; k < K; k++) s->xb[k] = f32_to_bf16(x[k]);
    } else if (c->wkind == W_INT8) {
        for (long k = 0; k < K; k++) x[k] = round_bf16(x[k]);
        split_input(x, K, s->xhi, s->xlo, &s->in8);
    }
}

static void layer_norm(const Config* c, const float* x, const void* w, const void* b, float* y) {
    long C = c->n_embd;
    float mean = 0, var = 0;
#pragma omp simd reduction(+ : mean)
    for (long i = 0; i < C; i++) mean += x[i];
    mean /= (float)C;
#pragma omp simd reduction(+ : var)
    for (long i = 0; i < C; i++) var += (x[i] - mean) * (x[i] - mean);
    float rstd = 1.0f / sqrtf(var / (float)C + c->eps);
    for (long i = 0; i < C; i++) {
        float v = (x[i] - mean) * rstd * load_act(w, i, c->act_bf16);
        if (b) v += load_act(b, i, c->act_bf16);
        y[i] = c->act_bf16 ? round_bf16(v) : v;
    }
}

/* Rotate the pairs (x[i], x[i + hs/2]) of one head by the angles of one position (model.apply_rope). */
static void rope_head(const Config* c, float* x, const float* cos_p, const float* sin_p) {
    long half = c->head_size / 2;
    for (long i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half];
        float y1 = x1 * cos_p[i] - x2 * sin_p[i], y2 = x1 * sin_p[i] + x2 * cos_p[i];
        x[i] = c->act_bf16 ? round_bf16(y1) : y1;
        x[i + half] = c->act_bf16 ? round_bf16(y2) : y2;
    }
}

/* One query head against `n` cache slots of its kv head: out = softmax(q k^T * scale) v. */
static void attend_head(const Config* c, const float* q, const void* k, const void* v, long n, float* scores,
                        float* out) {
    long hs = c->head_size;
    float top = -INFINITY;
    for (long t = 0; t < n; t++) {
        float d = 0;
        if (c->act_bf16) {
            const uint16_t* kt = (const uint16_t*)k + t * hs;
#pragma omp simd reduction(+ : d)
            for (long i = 0; i < hs; i++) d += q[i] * bf16_to_f32(kt[i]);
        } else {
            const float* kt = (const float*)k + t * hs;
#pragma omp simd reduction(+ : d)
            for (long i = 0; i < hs; i++) d += q[i] * kt[i];
        }
        scores[t] = d * c->attn_scale;
        top = scores[t] > top ? scores[t] : top;
    }
    float total = 0;
#pragma omp simd reduction(+ : total)
    for (long t = 0; t < n; t++) {
        scores[t] = exp_approx(scores[t] - top);
        total += scores[t];
    }
    for (long i = 0; i < hs; i++) out[i] = 0;
    for (long t = 0; t < n; t++) {
        float p = scores[t] / total;
        if (c->act_bf16) {
            const uint16_t* vt = (const uint16_t*)v + t * hs;
            for (long i = 0; i < hs; i++) out[i] += p * bf16_to_f32(vt[i]);
        } else {
            const float* vt = (const float*)v + t * hs;
            for (long i = 0; i < hs; i++) out[i] += p * vt[i];
        }
    }
    if (c->act_bf16) for (long i = 0; i < hs; i++) out[i] = round_bf16(out[i]);
}

static void store_act(void* p, long i, float v, int bf16) {
    if (bf16) ((uint16_t*)p)[i] = f32_to_bf16(v);
    else ((float*)p)[i] = v;
}

/* The pointers a step reads (native_decode.py lists them in this order). First the model's: wte,
 * wpe, ln_f weight and bias, the head's weight and scale, the rotary cos and sin tables. Then per
 * layer: ln_1 weight and bias; c_attn, attn.c_proj (weight, bias, scale each); ln_2 weight and
 * bias; c_fc, mlp.c_proj (3 each); k and v cache (1, nkv, S, hs); slot positions (1, S) int64. */
enum { G_WTE, G_WPE, G_LNF_W, G_LNF_B, G_HEAD, G_HEAD_SCALE, G_COS, G_SIN, GLOBAL_PTRS };
enum { L_LN1_W, L_LN1_B, L_ATTN, L_PROJ = L_ATTN + 3, L_LN2_W = L_PROJ + 3, L_LN2_B, L_FC, L_MPROJ = L_FC + 3,
       L_K = L_MPROJ + 3, L_V, L_SLOTS, LAYER_PTRS };

static Config config_of(const int64_t* cfg, const float* fcfg) {
    Config c = {cfg[0], cfg[1], cfg[2], cfg[3], cfg[4], cfg[5], cfg[6], (int)cfg[7], (int)cfg[8], (int)cfg[9],
                (int)cfg[10], fcfg ? fcfg[0] : 0, fcfg ? fcfg[1] : 0};
    return c;
}

static long max_slots_of(const Config* c, const int64_t* slots) {
    long most = 1;
    for (long l = 0; l < c->n_layer; l++) most = slots[l] > most ? slots[l] : most;
    return most;
}

/* Lay the step's activations out in `base` (NULL: only count them); the floats they take. */
static long carve_scratch(const Config* c, long max_slots, float* base, Scratch* s) {
    long C = c->n_embd, big = C > c->n_ffn ? C : c->n_ffn, at = 0;
#define TAKE(field, type, floats) do { if (base) s->field = (type)(base + at); at += (floats); } while (0)
    TAKE(x, float*, C);
    TAKE(xn, float*, big);
    TAKE(qkv, float*, (c->n_head + 2 * c->n_kv_head) * c->head_size);
    TAKE(att, float*, C);
    TAKE(h, float*, c->n_ffn);
    TAKE(out, float*, C);
    TAKE(scores, float*, c->n_head * max_slots);
    TAKE(xb, uint16_t*, (big + 1) / 2);   /* bfloat16: half a float each */
    TAKE(xhi, int8_t*, (big + 3) / 4);    /* bytes: a quarter */
    TAKE(xlo, uint8_t*, (big + 3) / 4);
#undef TAKE
    return at;
}

/* x += out, rounded as torch stores the residual stream (one thread). */
static void add_residual(const Config* c, float* x, const float* out) {
    for (long i = 0; i < c->n_embd; i++) x[i] = c->act_bf16 ? round_bf16(x[i] + out[i]) : x[i] + out[i];
}

static Linear linear_at(void* const* p) {
    Linear L = {p[0], p[1], p[2]};
    return L;
}

/* The step: `token` at absolute position `pos`, stored in cache column `col` (slot col % S of a
 * layer of S slots, attending over min(col + 1, S) slots). cfg: Config fields in order (see
 * native_decode.py); slots: S of each layer; threads: how many run it; logits (vocab,) float32. */
int gpt2lab_decode_step(const int64_t* cfg, const float* fcfg, const int64_t* slots, void* const* ptrs,
                        float* scratch, int64_t token, int64_t pos, int64_t col, int64_t threads,
                        float* logits) {
    Config c = config_of(cfg, fcfg);
    long C = c.n_embd, hs = c.head_size, nh = c.n_head, nkv = c.n_kv_head;
    long qkv_n = (nh + 2 * nkv) * hs, group = nh / nkv;
    long max_slots = max_slots_of(&c, slots);
    Scratch s;
    carve_scratch(&c, max_slots, scratch, &s);
    const float* cos_p = c.rope ? (const float*)ptrs[G_COS] + pos * (hs / 2) : NULL;
    const float* sin_p = c.rope ? (const float*)ptrs[G_SIN] + pos * (hs / 2) : NULL;

    for (long i = 0; i < C; i++) {
        float v = load_act(ptrs[G_WTE], token * C + i, c.act_bf16);
        if (c.learned_pos) {
            v += load_act(ptrs[G_WPE], pos * C + i, c.act_bf16);
            if (c.act_bf16) v = round_bf16(v);
        }
        s.x[i] = v;
    }

#pragma omp parallel num_threads(threads)
    {
        for (long l = 0; l < c.n_layer; l++) {
            void* const* lp = ptrs + GLOBAL_PTRS + l * LAYER_PTRS;
            Linear attn = linear_at(lp + L_ATTN), proj = linear_at(lp + L_PROJ), fc = linear_at(lp + L_FC),
                   mproj = linear_at(lp + L_MPROJ);
            long S = slots[l], slot = col % S, n = col + 1 < S ? col + 1 : S;
#pragma omp single
            {
                layer_norm(&c, s.x, lp[L_LN1_W], lp[L_LN1_B], s.xn);
                prepare_input(&c, &s, s.xn, C);
            }
            linear_rows(&c, &attn, &s, s.xn, s.qkv, qkv_n, C, 0);
#pragma omp barrier
#pragma omp single
            {
                float* q = s.qkv;
                float* k = s.qkv + nh * hs;
                float* v = k + nkv * hs;
                if (c.rope) {
                    for (long h = 0; h < nh; h++) rope_head(&c, q + h * hs, cos_p, sin_p);
                    for (long h = 0; h < nkv; h++) rope_head(&c, k + h * hs, cos_p, sin_p);
                }
                for (long h = 0; h < nkv; h++)
                    for (long i = 0; i < hs; i++) {
                        store_act(lp[L_K], (h * S + slot) * hs + i, k[h * hs + i], c.act_bf16);
                        store_act(lp[L_V], (h * S + slot) * hs + i, v[h * hs + i], c.act_bf16);
                    }
                ((int64_t*)lp[L_SLOTS])[slot] = pos;
            }
#pragma omp for schedule(static)
            for (long h = 0; h < nh; h++) {
                long kvh = h / group;
                size_t off = (size_t)kvh * S * hs * (c.act_bf16 ? 2 : 4);
                attend_head(&c, s.qkv + h * hs, (const char*)lp[L_K] + off, (const char*)lp[L_V] + off, n,
                            s.scores + h * max_slots, s.att + h * hs);
            }
#pragma omp single
            prepare_input(&c, &s, s.att, C);
            linear_rows(&c, &proj, &s, s.att, s.out, C, C, 0);
#pragma omp barrier
#pragma omp single
            {
                add_residual(&c, s.x, s.out);
                layer_norm(&c, s.x, lp[L_LN2_W], lp[L_LN2_B], s.xn);
                prepare_input(&c, &s, s.xn, C);
            }
            linear_rows(&c, &fc, &s, s.xn, s.h, c.n_ffn, C, 1);
#pragma omp barrier
#pragma omp single
            prepare_input(&c, &s, s.h, c.n_ffn);
            linear_rows(&c, &mproj, &s, s.h, s.out, C, c.n_ffn, 0);
#pragma omp barrier
#pragma omp single
            add_residual(&c, s.x, s.out);
        }
#pragma omp single
        {
            layer_norm(&c, s.x, ptrs[G_LNF_W], ptrs[G_LNF_B], s.xn);
            prepare_input(&c, &s, s.xn, C);
        }
        Linear head = {ptrs[G_HEAD], NULL, ptrs[G_HEAD_SCALE]};
        linear_rows(&c, &head, &s, s.xn, logits, c.vocab, C, 0);
    }
    return 0;
}

/* Floats of scratch a step needs (the caller allocates them). */
int64_t gpt2lab_scratch_floats(const int64_t* cfg, const int64_t* slots) {
    Config c = config_of(cfg, NULL);
    return carve_scratch(&c, max_slots_of(&c, slots), NULL, NULL);
}
