// Decode attention on 8-bit FibQuant codes with the codewords gathered straight into tensor-core fragments.
//
// FibQuant (arXiv 2605.11478) stores each head vector as a norm and, per block of KC rotated coordinates,
// one W-bit index into a shared codebook of 2^W codewords (bit-packed, codecs/packing.py). This kernel computes, for the ROWS query rows of one
// (sequence, KV head) and one split of the sequence, the flash-decoding partials (Dao et al. 2023): the
// unnormalised output in rotated space, the running max (base 2) and the normaliser.
//
// Why CUDA and not Triton: a Triton kernel gathers codewords into a blocked layout and the compiler then
// moves the tile through shared memory into the layout mma.sync reads (~16 instructions per coordinate,
// NOTES.md). Here every lane gathers exactly the halves its own mma fragment holds, so a codeword costs an
// index extraction and one shared-memory load. Two facts make that possible:
//  * the fragment a lane holds pairs coordinates (2t, 2t+1, 2t+8, 2t+9) of one key (mma B operand of
//    S = Q K^T) and coordinates (g, g+8) of tokens (2t, 2t+1) for values (A operand of O^T = V^T P^T);
//  * the rotation is any orthogonal matrix, so the coordinates of a codeword may be mapped to fragment
//    positions by any fixed permutation: the kernel reads the query and writes the output through it.
// The codebook sits in shared memory in COPIES lane-private copies laid out so that the 32 lanes of a warp
// always hit distinct banks, whatever indices they read (a random gather from one copy conflicts ~3-way).
//
// Compile-time constants (prepended as #defines by kernels/mma_decode.py): D head dim (64 or 128), KC
// codeword length (2 or 4), W index bits (8: N = 256, 2 or 4 bits per coordinate; 6: N = 64, k = 2, 3 bits), ROWS2 (1 when 9..16 query rows share the KV head, else 0), NW warps per block,
// SHARED_BOOK (1 when keys and values use the same codebook: one table).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define N_CODES (1 << W)                // codewords; W-bit indices, W = 6 or 8
#define WORDS (KC / 2)                  // 32-bit words per codeword
#define COPIES (32 / WORDS)             // lane-private copies: one bank per lane and word
#define TABLE_WORDS (N_CODES * 32)      // COPIES * WORDS = 32 words per codeword row: 8 or 32 KiB
#define KSTEPS (D / 16)                 // k-steps of S = Q K^T, m-tiles of O^T
#define KEY_CODES (D / (4 * KC))        // codewords one lane reads per key
#define VAL_CODES (D / (8 * KC))        // codewords one lane reads per value
#define KEY_BYTES (KEY_CODES * W / 8)   // their index bytes (whole: the lane starts on a byte)
#define VAL_BYTES (VAL_CODES * W / 8)
#define NBYTES (D / KC * W / 8)         // index bytes per token
#define KEY_ALIGN (KEY_BYTES & -KEY_BYTES)  // the alignment of a lane's index bytes (row starts on 16)
#define VAL_ALIGN (VAL_BYTES & -VAL_BYTES)
#define TILE 16                         // tokens per warp iteration: two n-tiles of keys, one k-tile of values
#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ void mma16816(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float half_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u32 pack_halves(float lo, float hi) {  // (lo, hi) -> f16x2, lo in bits 0..15
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// NB index bytes at p, aligned to A bytes, as 32-bit words (little-endian): the widest loads A allows.
template <int NB, int A>
__device__ __forceinline__ void load_bytes(const u8* p, u32* w) {
    if (NB == 16 && A >= 16) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else if (NB == 8 && A >= 8) {
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
        w[0] = v.x; w[1] = v.y;
    } else if (NB % 4 == 0 && A >= 4) {
#pragma unroll
        for (int i = 0; i < NB / 4; ++i) w[i] = __ldg(reinterpret_cast<const u32*>(p) + i);
    } else {
#pragma unroll
        for (int i = 0; i < (NB + 3) / 4; ++i) w[i] = 0;
        if (A >= 2 && NB % 2 == 0) {
#pragma unroll
            for (int i = 0; i < NB / 2; ++i)
                w[i / 2] |= (u32)__ldg(reinterpret_cast<const u16*>(p) + i) << (16 * (i % 2));
        } else {
#pragma unroll
            for (int i = 0; i < NB; ++i) w[i / 4] |= (u32)__ldg(p + i) << (8 * (i % 4));
        }
    }
}

// The NC codewords whose W-bit indices ``idx`` holds (index j at bits [j W, (j + 1) W)), as NC * WORDS 32-bit
// words of f16 pairs in codebook order. ``lane_table`` is the shared-memory address of this lane's copy,
// codeword n at byte offset 128 n: an 8-bit index costs one byte permute and one multiply-add, a 6-bit one a
// funnel shift, a mask and the add (a 32-bit shared address; a C++ pointer cost one more instruction each).
// The loads are not volatile, so the compiler schedules them freely; they stay after the barrier that fills
// the tables because their addresses come from global loads issued after it.
template <int NC>
__device__ __forceinline__ void gather(u32 lane_table, const u32* idx, u32* out) {
#pragma unroll
    for (int j = 0; j < NC; ++j) {
        u32 code;
        if (W == 8) {
            code = __byte_perm(idx[j >> 2], 0, 0x4440 + (j & 3));
        } else {
            const int bit = j * W, word = bit >> 5;
            const u32 next = (bit & 31) + W > 32 ? idx[word + 1] : 0u;
            code = __funnelshift_r(idx[word], next, bit & 31) & (N_CODES - 1);
        }
        const u32 entry = lane_table + (code << 7);
        if (WORDS == 2) {
            asm("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(out[2 * j]), "=r"(out[2 * j + 1]) : "r"(entry));
        } else {
            asm("ld.shared.u32 %0, [%1];\n" : "=r"(out[j]) : "r"(entry));
        }
    }
}

// Everything one lane reads from global memory for one tile: index words of keys base + 8 nt + g and of values
// base + (2t, 2t+1, 2t+8, 2t+9), and the norm pairs of tokens base + 8 nt + (2t, 2t+1) as f16x2. Loaded one
// tile ahead (software pipelining), so the global latency hides behind the previous tile's work.
struct Tile {
    u32 kidx[2][(KEY_BYTES + 3) / 4];
    u32 vidx[4][(VAL_BYTES + 3) / 4];
    u32 knorm[2], vnorm[2];
};

#define HALF_NEG_INF 0xfc00u  // a missing token's key norm: its score is -inf, its weight 0

// The norms of tokens tok, tok + 1 as f16x2; ``missing`` stands for a token at or past ``hi``. Two 16-bit
// loads: a row of an odd length puts every other row's norms off a 4-byte boundary.
__device__ __forceinline__ u32 norm_pair(const u16* pair, int tok, int hi, u32 missing) {
    const u32 first = tok < hi ? (u32)__ldg(pair) : missing;
    return first | ((tok + 1 < hi ? (u32)__ldg(pair + 1) : missing) << 16);
}

// This lane's pointers at token 0: keys g (lane byte t), values 2t (lane byte g), norms 2t.
struct LanePtrs {
    const u8 *k, *v;
    const u16 *kn, *vn;
};

// TAIL: the tile reaches past ``hi``: tokens are clamped to hi - 1 (never read out of bounds) and the
// missing ones get norm -inf (keys) and 0 (values). Otherwise every address is a fixed offset from the tile's.
template <bool TAIL>
__device__ __forceinline__ void load_tile(Tile& tile, const LanePtrs& lp, int base, int hi, int g, int t) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
        const int first = base + 8 * nt;  // this n-tile's first token
        const int kt = TAIL ? min(first + g, hi - 1) - g : first;
        load_bytes<KEY_BYTES, KEY_ALIGN>(lp.k + (long long)kt * NBYTES, tile.kidx[nt]);
        if (TAIL) {
            tile.knorm[nt] = norm_pair(lp.kn + first, first + 2 * t, hi, HALF_NEG_INF);
            tile.vnorm[nt] = norm_pair(lp.vn + first, first + 2 * t, hi, 0u);
        } else {
            tile.knorm[nt] = (u32)__ldg(lp.kn + first) | ((u32)__ldg(lp.kn + first + 1) << 16);
            tile.vnorm[nt] = (u32)__ldg(lp.vn + first) | ((u32)__ldg(lp.vn + first + 1) << 16);
        }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int first = base + (j & 1) + 8 * (j >> 1);  // token 2t + first is this lane's
        const int vt = TAIL ? min(first + 2 * t, hi - 1) - 2 * t : first;
        load_bytes<VAL_BYTES, VAL_ALIGN>(lp.v + (long long)vt * NBYTES, tile.vidx[j]);
    }
}

__device__ __forceinline__ void load_tile_any(Tile& tile, const LanePtrs& lp, int base, int hi, int g, int t) {
    if (base + TILE <= hi) load_tile<false>(tile, lp, base, hi, g, t);
    else load_tile<true>(tile, lp, base, hi, g, t);
}

// Fill the lane-private tables: word w of codeword n, copy c, at (n * COPIES + c) * WORDS + w.
__device__ __forceinline__ void fill_table(u32* table, const u32* book) {
    for (int i = threadIdx.x; i < TABLE_WORDS; i += NW * 32) {
        table[i] = __ldg(book + (i / 32) * WORDS + i % WORDS);
    }
}

extern "C" __global__ void __launch_bounds__(NW * 32, ROWS2 ? 1 : 16 / NW) fibquant_mma_decode(
    const u16* __restrict__ q,       // (BH, rows, D) f16: rotated, scaled by scaling * log2(e)
    const u8* __restrict__ kidx, const u16* __restrict__ knorm,
    const u8* __restrict__ vidx, const u16* __restrict__ vnorm,
    const u32* __restrict__ kbook, const u32* __restrict__ vbook,  // (256, KC) f16 codebooks as words
    const int* __restrict__ lens,    // (BH,) visible tokens per row, or NULL
    float* __restrict__ acc_out, float* __restrict__ max_out, float* __restrict__ sum_out,
    int s_kv, int chunk, int n_kv_heads, int split_offset, int split_total, int rows,
    int kidx_sb, int kidx_sh, int knorm_sb, int knorm_sh,
    int vidx_sb, int vidx_sh, int vnorm_sb, int vnorm_sh) {
    extern __shared__ u32 smem[];
    u32* ktable = smem;
    u32* vtable = SHARED_BOOK ? smem : smem + TABLE_WORDS;
    fill_table(ktable, kbook);
    if (!SHARED_BOOK) fill_table(vtable, vbook);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.x, b = bh / n_kv_heads, h = bh % n_kv_heads;
    int length = s_kv;
    if (lens != nullptr) length = min(lens[bh], s_kv);
    const int lo = blockIdx.y * chunk;
    const int hi = min(lo + chunk, length);

    const u8* krow = kidx + (long long)b * kidx_sb + (long long)h * kidx_sh;
    const u8* vrow = vidx + (long long)b * vidx_sb + (long long)h * vidx_sh;
    const u16* knrow = knorm + (long long)b * knorm_sb + (long long)h * knorm_sh;
    const u16* vnrow = vnorm + (long long)b * vnorm_sb + (long long)h * vnorm_sh;
    const u32 k_lane = (u32)__cvta_generic_to_shared(ktable + (lane % COPIES) * WORDS);
    const u32 v_lane = (u32)__cvta_generic_to_shared(vtable + (lane % COPIES) * WORDS);

    // Query fragments, mma A of S = Q K^T (m = query rows, k = coordinates): k-step s holds codec coordinates
    // 4 (t KSTEPS + s) + 0..3 of rows g and g + 8 at fragment columns (2t, 2t+1 | 2t+8, 2t+9): four
    // consecutive halves, one 8-byte load. Rows past ``rows`` are zero.
    u32 qa[KSTEPS][4];
#pragma unroll
    for (int s = 0; s < KSTEPS; ++s) {
        const int col = 4 * (t * KSTEPS + s);
        uint2 v0 = make_uint2(0, 0), v1 = make_uint2(0, 0);
        if (g < rows) v0 = *reinterpret_cast<const uint2*>(q + ((long long)bh * rows + g) * D + col);
        if (g + 8 < rows)
            v1 = *reinterpret_cast<const uint2*>(q + ((long long)bh * rows + g + 8) * D + col);
        qa[s][0] = v0.x; qa[s][1] = v1.x; qa[s][2] = v0.y; qa[s][3] = v1.y;
    }

    // Rows g and g + 8 (r = 0, 1): running max (base 2), the same in the 4 lanes of a row, and this lane's
    // share of the normaliser (its tokens 2t, 2t+1, 2t+8, 2t+9 of every tile).
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};
    float acc[KSTEPS][1 + ROWS2][4];  // O^T: m-tile i (coords 16i + g | + 8) x rows (8n + 2t, + 1)
#pragma unroll
    for (int i = 0; i < KSTEPS; ++i)
#pragma unroll
        for (int n = 0; n <= ROWS2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][n][e] = 0.f;
    __syncthreads();

    const LanePtrs lp = {krow + g * NBYTES + t * KEY_BYTES, vrow + 2 * t * NBYTES + g * VAL_BYTES,
                         knrow + 2 * t, vnrow + 2 * t};
    Tile next;
    if (lo + warp * TILE < hi) load_tile_any(next, lp, lo + warp * TILE, hi, g, t);
    for (int base = lo + warp * TILE; base < hi; base += NW * TILE) {
        const Tile cur = next;
        if (base + NW * TILE < hi) load_tile_any(next, lp, base + NW * TILE, hi, g, t);
        // S = Q K^T over two n-tiles of 8 tokens: mma B is key base + 8 nt + g, one codeword load per k-step
        // c[nt] = rows g (0, 1), g + 8 (2, 3) x tokens base + 8 nt + 2t (+ 1); even and odd k-steps in two
        // accumulators, halving the chain of dependent mma
        float c[2][4], c_odd[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            u32 kw[KEY_CODES * WORDS];
            gather<KEY_CODES>(k_lane, cur.kidx[nt], kw);
#pragma unroll
            for (int e = 0; e < 4; ++e) c[nt][e] = c_odd[nt][e] = 0.f;
#pragma unroll
            for (int s = 0; s < KSTEPS; ++s)
                mma16816(s % 2 ? c_odd[nt] : c[nt], qa[s][0], qa[s][1], qa[s][2], qa[s][3], kw[2 * s],
                         kw[2 * s + 1]);
#pragma unroll
            for (int e = 0; e < 4; ++e) c[nt][e] += c_odd[nt][e];
        }
        float kn[2][2], vn[2][2];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            kn[nt][0] = half_to_float(cur.knorm[nt] & 0xffff); kn[nt][1] = half_to_float(cur.knorm[nt] >> 16);
            vn[nt][0] = half_to_float(cur.vnorm[nt] & 0xffff); vn[nt][1] = half_to_float(cur.vnorm[nt] >> 16);
        }
        // online softmax of rows g (r = 0) and g + 8 (r = 1) over the tile
        float alpha[2];
        u32 pb[2][2];  // mma B of O^T = V^T P^T: tokens (2t, 2t+1 | 2t+8, 2t+9) x row g [+ 8]
        bool grew = false;
#pragma unroll
        for (int r = 0; r <= ROWS2; ++r) {
            float tile_max = NEG_INF;
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    // -inf norms mark missing tokens: score -inf whatever the (finite) dot product
                    const float sc = kn[nt][e] == NEG_INF ? NEG_INF : c[nt][2 * r + e] * kn[nt][e];
                    c[nt][2 * r + e] = sc;
                    tile_max = fmaxf(tile_max, sc);
                }
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 2));
            const float m_new = fmaxf(m_run[r], tile_max);  // finite: the tile has a visible token
            grew |= m_new > m_run[r];
            alpha[r] = fast_exp2(m_run[r] - m_new);
            m_run[r] = m_new;
            float p_sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                const float p0 = fast_exp2(c[nt][2 * r] - m_new), p1 = fast_exp2(c[nt][2 * r + 1] - m_new);
                p_sum += p0 + p1;
                pb[r][nt] = pack_halves(p0 * vn[nt][0], p1 * vn[nt][1]);
            }
            l_run[r] = l_run[r] * alpha[r] + p_sum;
        }
        if (__any_sync(0xffffffff, grew)) {
            // rescale O^T, rarely once a few tiles are in: its columns are rows 2t, 2t+1 [+ 8], whose alpha
            // lanes 8t and 8t + 4 hold
#pragma unroll
            for (int n = 0; n <= ROWS2; ++n) {
                const float a_even = __shfl_sync(0xffffffff, alpha[n], 8 * t);
                const float a_odd = __shfl_sync(0xffffffff, alpha[n], 8 * t + 4);
#pragma unroll
                for (int i = 0; i < KSTEPS; ++i) {
                    acc[i][n][0] *= a_even;
                    acc[i][n][1] *= a_odd;
                    acc[i][n][2] *= a_even;
                    acc[i][n][3] *= a_odd;
                }
            }
        }
        // values 2t, 2t+1, 2t+8, 2t+9: A fragments of V^T pair two tokens per register (gathered after the
        // softmax: before it, the 32 live words push the variant past 128 registers and it spills)
        u32 vw[4][VAL_CODES * WORDS];
#pragma unroll
        for (int j = 0; j < 4; ++j) gather<VAL_CODES>(v_lane, cur.vidx[j], vw[j]);
#pragma unroll
        for (int i = 0; i < KSTEPS; ++i) {
            const u32 a0 = __byte_perm(vw[0][i], vw[1][i], 0x5410);  // coord 16i + g, tokens 2t, 2t+1
            const u32 a1 = __byte_perm(vw[0][i], vw[1][i], 0x7632);  // coord 16i + g + 8
            const u32 a2 = __byte_perm(vw[2][i], vw[3][i], 0x5410);  // tokens 2t+8, 2t+9
            const u32 a3 = __byte_perm(vw[2][i], vw[3][i], 0x7632);
#pragma unroll
            for (int n = 0; n <= ROWS2; ++n) mma16816(acc[i][n], a0, a1, a2, a3, pb[n][0], pb[n][1]);
        }
    }

    // merge the NW warps of the block through shared memory (the tables are dead: reuse them)
    __syncthreads();
    float* s_max = reinterpret_cast<float*>(smem);  // [NW][16]
    float* s_sum = s_max + NW * 16;                 // [NW][16]
    float* s_acc = s_sum + NW * 16;                 // [16][D], rows in codec coordinates
#pragma unroll
    for (int r = 0; r <= ROWS2; ++r) {
        float l = l_run[r] + __shfl_xor_sync(0xffffffff, l_run[r], 1);
        l += __shfl_xor_sync(0xffffffff, l, 2);
        if (t == 0) {
            s_max[warp * 16 + 8 * r + g] = m_run[r];
            s_sum[warp * 16 + 8 * r + g] = l;
        }
    }
    for (int i = threadIdx.x; i < 16 * D; i += NW * 32) s_acc[i] = 0.f;
    __syncthreads();
    float scale[1 + ROWS2][2];  // this warp's weight in the block, per O^T column (row 8n + 2t + e)
#pragma unroll
    for (int n = 0; n <= ROWS2; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int row = 8 * n + 2 * t + e;
            float top = NEG_INF;
            for (int w = 0; w < NW; ++w) top = fmaxf(top, s_max[w * 16 + row]);
            const float mine = s_max[warp * 16 + row];
            scale[n][e] = mine == NEG_INF ? 0.f : fast_exp2(mine - top);
        }
    // O^T element (m-tile i, half hh, column e) is kernel coordinate 16i + 8hh + g = codec g D/8 + 2i + hh
    for (int w = 0; w < NW; ++w) {  // one warp at a time: no atomics
        if (warp == w) {
#pragma unroll
            for (int n = 0; n <= ROWS2; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float* out = s_acc + (8 * n + 2 * t + e) * D + g * (D / 8);
#pragma unroll
                    for (int i = 0; i < KSTEPS; ++i) {
                        out[2 * i] += acc[i][n][e] * scale[n][e];
                        out[2 * i + 1] += acc[i][n][2 + e] * scale[n][e];
                    }
                }
        }
        __syncthreads();
    }
    const long long out_row = ((long long)bh * split_total + split_offset + blockIdx.y) * rows;
    for (int i = threadIdx.x; i < rows * D; i += NW * 32) acc_out[out_row * D + i] = s_acc[i];
    if (threadIdx.x < rows) {
        float top = NEG_INF, total = 0.f;
        for (int w = 0; w < NW; ++w) top = fmaxf(top, s_max[w * 16 + threadIdx.x]);
        for (int w = 0; w < NW; ++w) {
            const float mw = s_max[w * 16 + threadIdx.x];
            if (mw != NEG_INF) total += s_sum[w * 16 + threadIdx.x] * fast_exp2(mw - top);
        }
        max_out[out_row + threadIdx.x] = top;
        sum_out[out_row + threadIdx.x] = total;
    }
}
