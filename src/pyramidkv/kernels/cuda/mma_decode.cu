// Decode attention on FibQuant codes with the codewords gathered straight into tensor-core fragments.
//
// FibQuant (arXiv 2605.11478) stores each head vector as a norm and, per block of KC rotated coordinates,
// one W-bit index into a shared codebook of 2^W codewords (bit-packed, codecs/packing.py). This kernel
// computes, for the ROWS query rows of one (sequence, KV head) and one split of the sequence, the
// flash-decoding partials (Dao et al. 2023): the unnormalised output in rotated space, the running max
// (base 2) and the normaliser.
//
// Why CUDA and not Triton: a Triton kernel gathers codewords into a blocked layout and the compiler then
// moves the tile through shared memory into the layout mma.sync reads (~16 instructions per coordinate,
// NOTES.md). Here every lane gathers exactly the halves its own mma fragment holds, so a codeword costs an
// index extraction and one shared-memory load. Three facts make that possible:
//  * the fragment a lane holds pairs coordinates (2t, 2t+1, 2t+8, 2t+9) of one key (mma B operand of
//    S = Q K^T) and coordinates (g, g+8) of two tokens for values (A operand of O^T = V^T P^T);
//  * the rotation is any orthogonal matrix, so the coordinates of a codeword may be mapped to fragment
//    positions by any fixed permutation: the kernel reads the query and writes the output through it;
//  * attention does not depend on the order of the tokens, so the tokens of a tile may sit in any mma
//    column: the order pi below gives each lane four consecutive tokens (one load per norm array).
// The codebook sits in shared memory in COPIES lane-private copies laid out so that the 32 lanes of a warp
// always hit distinct banks, whatever indices they read (a random gather from one copy conflicts ~3-way).
// The index bytes stream into a per-warp ring of shared memory by cp.async (16 or 8 bytes per copy, all
// lanes), so no registers wait on global memory; measured 3-11% faster than loading them into registers
// one tile ahead (NOTES.md, v6).
//
// Compile-time constants (prepended as #defines by kernels/mma_decode.py): D head dim (64 or 128), KC
// codeword length (2 or 4), W index bits (8: N = 256, 2 or 4 bits per coordinate; 6: N = 64, k = 2,
// 3 bits), ROWS2 (1 when 9..16 query rows share the KV head, else 0), NW warps per block, SHARED_BOOK (1
// when keys and values use the same codebook: one table), STAGES (tiles per warp's ring, >= 2).

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
#define KEY_ALIGN (KEY_BYTES & -KEY_BYTES)  // the alignment of a lane's index bytes (slot rows start on 8)
#define VAL_ALIGN (VAL_BYTES & -VAL_BYTES)
#define TILE 16                         // tokens per warp iteration: two n-tiles of keys, one k-tile of values
#define ARRAY_BYTES (TILE * NBYTES)     // one tile of key (or value) index bytes
#define SLOT_BYTES (2 * ARRAY_BYTES)    // a ring slot: the tile's key bytes, then its value bytes
#define CHUNK (NBYTES % 16 ? 8 : 16)   // bytes per async copy: rows of 24 bytes start on 8 only
#define CHUNKS (SLOT_BYTES / CHUNK)     // async copies per slot
#define CHUNKS_PER_LANE ((CHUNKS + 31) / 32)
// Rows of a slot are permuted so that the index reads of a warp spread over the banks (a row permutation per
// rate, searched offline for the fewest shared-memory wavefronts); rows of 24 bytes (d = 64, 3 bits) stay.
#define SWZ (NBYTES % 16 == 0)
#define SWZ_A (NBYTES == 32 ? 2 : 0)
#define SWZ_B (NBYTES == 48 ? 2 : 1)
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

// Tokens of a tile sit in the mma columns in the order pi: column c of n-tile nt holds token
// 4 (c >> 1) + 2 nt + (c & 1), so the four tokens whose scores and values lane t holds are 4t .. 4t + 3: one
// 8-byte load of key norms and one of value norms per tile. Key B fragments are read for token pi(nt, g).
__device__ __forceinline__ int key_token(int nt, int g) { return 4 * (g >> 1) + 2 * nt + (g & 1); }

// The row of a ring slot that holds token r of the tile.
__device__ __forceinline__ int slot_row(int r) {
    return SWZ ? r ^ (((r >> 2) & 1) * SWZ_A) ^ ((r >> 3) * SWZ_B) : r;
}

#define HALF_NEG_INF 0xfc00u  // a missing token's key norm: its score is -inf, its weight 0

// Norms of this lane's tokens 4t .. 4t + 3 of one tile as two f16x2 pairs (tokens 4t, 4t+1 | 4t+2, 4t+3).
struct Norms {
    u32 k[2], v[2];
};

// WIDE: the norm rows are 8-byte aligned (one load per array); otherwise 16-bit loads. TAIL: tokens at or
// past ``hi`` are not read and get key norm -inf and value norm 0.
template <bool WIDE, bool TAIL>
__device__ __forceinline__ void load_norms(Norms& n, const u16* kn, const u16* vn, int tok, int hi) {
    if (WIDE && !TAIL) {
        const uint2 k = __ldg(reinterpret_cast<const uint2*>(kn + tok));
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(vn + tok));
        n.k[0] = k.x; n.k[1] = k.y; n.v[0] = v.x; n.v[1] = v.y;
    } else {
#pragma unroll
        for (int p = 0; p < 2; ++p) {
            u32 kw = 0, vw = 0;
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int i = tok + 2 * p + e;
                const bool in = !TAIL || i < hi;
                kw |= (in ? (u32)__ldg(kn + i) : HALF_NEG_INF) << (16 * e);
                vw |= (in ? (u32)__ldg(vn + i) : 0u) << (16 * e);
            }
            n.k[p] = kw; n.v[p] = vw;
        }
    }
}

__device__ __forceinline__ void load_norms_any(Norms& n, const u16* kn, const u16* vn, int tok, int base, int hi,
                                               bool wide) {
    if (base + TILE > hi) load_norms<false, true>(n, kn, vn, tok, hi);
    else if (wide) load_norms<true, false>(n, kn, vn, tok, hi);
    else load_norms<false, false>(n, kn, vn, tok, hi);
}

__device__ __forceinline__ void cp_async(u32 dst, const void* src, int bytes) {
    if (CHUNK == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

// Start copying the index bytes of the tile at ``base`` (keys, then values: 16 NBYTES bytes each, contiguous
// in global memory) into a ring slot, CHUNK bytes per lane and copy; bytes at or past token ``hi`` are zero-filled
// (index 0: a valid codeword whose score the key norm -inf discards).
__device__ __forceinline__ void copy_tile(u32 slot, const u8* krow, const u8* vrow, int base, int hi, int lane) {
    const int present = (hi - base) * NBYTES;
#pragma unroll
    for (int i = 0; i < CHUNKS_PER_LANE; ++i) {
        const int c = lane + 32 * i;
        if (CHUNKS % 32 == 0 || c < CHUNKS) {
            const bool val = c >= CHUNKS / 2;
            const int byte = (c - (val ? CHUNKS / 2 : 0)) * CHUNK;
            const u8* row = val ? vrow : krow;
            const int n = min(max(present - byte, 0), CHUNK);
            const u32 at = SWZ ? slot_row(byte / NBYTES) * NBYTES + byte % NBYTES : byte;
            cp_async(slot + (val ? ARRAY_BYTES : 0) + at, n > 0 ? row + (long long)base * NBYTES + byte : row, n);
        }
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// NB index bytes at shared address p, aligned to A bytes, as 32-bit words (little-endian): the widest loads A
// allows. Volatile: they must stay after the wait for the async copies.
template <int NB, int A>
__device__ __forceinline__ void lds_bytes(u32 p, u32* w) {
    if (NB == 16 && A >= 16) {
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "r"(p));
    } else if (NB == 8 && A >= 8) {
        asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(w[0]), "=r"(w[1]) : "r"(p));
    } else if (NB % 4 == 0 && A >= 4) {
#pragma unroll
        for (int i = 0; i < NB / 4; ++i) asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(w[i]) : "r"(p + 4 * i));
    } else {
#pragma unroll
        for (int i = 0; i < (NB + 3) / 4; ++i) w[i] = 0;
        if (A >= 2 && NB % 2 == 0) {
#pragma unroll
            for (int i = 0; i < NB / 2; ++i) {
                u16 x;
                asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(x) : "r"(p + 2 * i));
                w[i / 2] |= (u32)x << (16 * (i % 2));
            }
        } else {
#pragma unroll
            for (int i = 0; i < NB; ++i) {
                u16 x;
                asm volatile("ld.shared.u8 %0, [%1];\n" : "=h"(x) : "r"(p + i));
                w[i / 4] |= (u32)(x & 0xff) << (8 * (i % 4));
            }
        }
    }
}

// This lane's index words of one tile, read from its ring slot: keys pi(nt, g) (bytes t KEY_BYTES on) and
// values 4t + j (bytes g VAL_BYTES on).
struct Tile {
    u32 kidx[2][(KEY_BYTES + 3) / 4];
    u32 vidx[4][(VAL_BYTES + 3) / 4];
};

__device__ __forceinline__ void read_tile(Tile& tile, u32 slot, int g, int t) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
        lds_bytes<KEY_BYTES, KEY_ALIGN>(slot + slot_row(key_token(nt, g)) * NBYTES + t * KEY_BYTES, tile.kidx[nt]);
#pragma unroll
    for (int j = 0; j < 4; ++j)
        lds_bytes<VAL_BYTES, VAL_ALIGN>(slot + ARRAY_BYTES + slot_row(4 * t + j) * NBYTES + g * VAL_BYTES,
                                        tile.vidx[j]);
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
    // share of the normaliser (its tokens 4t .. 4t + 3 of every tile).
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};
    float acc[KSTEPS][1 + ROWS2][4];  // O^T: m-tile i (coords 16i + g | + 8) x rows (8n + 2t, + 1)
#pragma unroll
    for (int i = 0; i < KSTEPS; ++i)
#pragma unroll
        for (int n = 0; n <= ROWS2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][n][e] = 0.f;
    __syncthreads();

    // Index bytes stream through a ring of STAGES slots per warp (cp.async, no registers held in flight);
    // norms are loaded into registers one tile ahead.
    const u32 ring = (u32)__cvta_generic_to_shared(smem + (SHARED_BOOK ? 1 : 2) * TABLE_WORDS) +
                     warp * STAGES * SLOT_BYTES;
    const bool wide = ((reinterpret_cast<size_t>(knrow) | reinterpret_cast<size_t>(vnrow)) & 7) == 0;
    const int step = NW * TILE;
    const int first = lo + warp * TILE;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (first + s * step < hi) copy_tile(ring + s * SLOT_BYTES, krow, vrow, first + s * step, hi, lane);
        else asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
    Norms next_norms;
    if (first < hi) load_norms_any(next_norms, knrow, vnrow, first + 4 * t, first, hi, wide);
    int slot_at = 0;  // the ring slot of the tile at ``base``
    for (int base = first; base < hi; base += step) {
        const Norms norms = next_norms;
        if (base + step < hi) load_norms_any(next_norms, knrow, vnrow, base + step + 4 * t, base + step, hi, wide);
        asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 2) : "memory");
        __syncwarp();
        // refill the slot the previous tile used: every lane has read it (the barrier above)
        const int ahead = base + (STAGES - 1) * step;
        const u32 refill = ring + (slot_at == 0 ? STAGES - 1 : slot_at - 1) * SLOT_BYTES;
        if (ahead < hi) copy_tile(refill, krow, vrow, ahead, hi, lane);
        else asm volatile("cp.async.commit_group;\n" ::: "memory");
        Tile cur;
        read_tile(cur, ring + slot_at * SLOT_BYTES, g, t);
        slot_at = slot_at == STAGES - 1 ? 0 : slot_at + 1;
        // S = Q K^T over two n-tiles of 8 tokens: mma B is key pi(nt, g), one codeword load per k-step
        // c[nt] = rows g (0, 1), g + 8 (2, 3) x tokens 4t + 2nt (+ 1); even and odd k-steps in two
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
        float kn[2][2];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            kn[nt][0] = half_to_float(norms.k[nt] & 0xffff); kn[nt][1] = half_to_float(norms.k[nt] >> 16);
        }
        // online softmax of rows g (r = 0) and g + 8 (r = 1) over the tile
        float alpha[2];
        u32 pb[2][2];  // mma B of O^T = V^T P^T: k rows 8nt + 2t (+ 1) = tokens 4t + 2nt (+ 1), x row g [+ 8]
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
                // the value norms applied in f16x2: the product enters the mma in f16 anyway
                asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(pb[r][nt]) : "r"(pack_halves(p0, p1)), "r"(norms.v[nt]));
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
        // values 4t .. 4t + 3: A fragments of V^T pair two tokens per register (gathered after the
        // softmax: before it, the 32 live words push the variant past 128 registers and it spills)
        u32 vw[4][VAL_CODES * WORDS];
#pragma unroll
        for (int j = 0; j < 4; ++j) gather<VAL_CODES>(v_lane, cur.vidx[j], vw[j]);
#pragma unroll
        for (int i = 0; i < KSTEPS; ++i) {
            const u32 a0 = __byte_perm(vw[0][i], vw[1][i], 0x5410);  // coord 16i + g, tokens 4t, 4t+1
            const u32 a1 = __byte_perm(vw[0][i], vw[1][i], 0x7632);  // coord 16i + g + 8
            const u32 a2 = __byte_perm(vw[2][i], vw[3][i], 0x5410);  // tokens 4t+2, 4t+3
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
