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
// docs/kernels.md section 5). Here every lane gathers exactly the halves its own mma fragment holds, so a codeword costs a
// byte permute (its offset in the table) and one shared-memory load. Two facts make that possible:
//  * the fragment a lane holds pairs coordinates (2t, 2t+1, 2t+8, 2t+9) of one key (mma B operand of
//    S = Q K^T) and coordinates (g, g+8) of two tokens for values (A operand of O^T = V^T P^T), or, with at most
//    4 query rows, two coordinates of one token per register, the pair its codeword stores (see attend);
//  * the rotation is any orthogonal matrix, so the coordinates of a codeword may be mapped to fragment
//    positions by any fixed permutation: the kernel reads the query and writes the output through it.
// The codebook sits in shared memory in COPIES lane-private copies laid out so that the 32 lanes of a warp
// always hit distinct banks, whatever indices they read (a random gather from one copy conflicts ~3-way).
// Each warp streams its tiles (index bytes and norms, in token order) into a ring of shared memory with cp.async;
// each lane's copies of a tile form one cp.async group, so waiting for a tile is a group count (docs/kernels.md
// section 4; an mbarrier per slot is slower: section 11).
//
// Compile-time constants (prepended as #defines by kernels/cuda_decode.py): D head dim (64 or 128), KC
// codeword length (2 or 4), W index bits (8: N = 256, 2 or 4 bits per coordinate; 6: N = 64, 3 bits at k = 2,
// 1.5 at k = 4; 5 and 7: 2.5 and 3.5 bits at k = 2), ROWS_CAP (the most query rows per KV head the variant
// holds: 4, 8 or 16), NW warps per block, SHARED_BOOK (1 when keys and values use the same codebook), STAGES (tiles per warp's ring, >= 2), ROW_BYTES (a
// codeword's row in the table: 256, or 128 where two blocks of 256-byte rows do not fit an SM's shared memory),
// SWIZZLED, ROW_PERM and CHUNK_XOR (whether the ring slots are swizzled, and how: see slot_byte), KEYS_AFFINE (1: the
// keys are codes of a uniform grid, multiplied as int8 with no codebook: see keys_affine; 2-bit codes beside values of
// 8-bit indices, 3-bit codes in planes beside values of 6-bit ones), TPS (tiles per ring slot: a wait, two warp
// barriers, a commit and a fill's bookkeeping serve TPS tiles).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define N_CODES (1 << W)                // codewords; W-bit indices, W = 5 to 8
#define WORDS (KC / 2)                  // 32-bit words per codeword
#define COPIES (32 / WORDS)             // lane-private copies: one bank per lane and word
// Table rows of 256 bytes hold the key codeword's copies in bytes 0..127 and the value codeword's in 128..255;
// with 128-byte rows a second table follows for values when the codebooks differ.
#define TABLE_BYTES (N_CODES * ROW_BYTES * (ROW_BYTES == 128 && !SHARED_BOOK ? 2 : 1))
#define ROWS2 (ROWS_CAP == 16)          // rows g + 8 of the scores are query rows too: two n-tiles of O^T
#define PAIRED (ROWS_CAP == 4)          // a value register pairs two coordinates of one token (see attend)
#define KSTEPS (D / 16)                 // k-steps of S = Q K^T
#define VTILES (PAIRED ? D / 32 : D / 16)  // m-tiles of O^T: 32 coordinates each when PAIRED, else 16
#define KEY_CODES (D / (4 * KC))        // codewords one lane reads per key
#define VAL_CODES (D / (8 * KC))        // codewords one lane reads per value
#define KEY_BYTES (KEY_CODES * W / 8)   // their index bytes (whole: the lane starts on a byte)
#define VAL_BYTES (VAL_CODES * W / 8)
#define NBYTES (D / KC * W / 8)         // index bytes per token
#define KEY_ALIGN (KEY_BYTES & -KEY_BYTES)  // the alignment of a lane's index bytes
#define VAL_ALIGN (VAL_BYTES & -VAL_BYTES)
#define TILE 16                         // tokens per warp iteration: two n-tiles of keys, one k-tile of values
#define ARRAY_BYTES (TILE * NBYTES)     // one tile of key (or value) index bytes
#define SLOT_BYTES (2 * ARRAY_BYTES + 4 * TILE)  // a tile's place in the ring: key and value bytes, their norms
#define SLOTS (STAGES / TPS)            // ring slots of TPS tiles each (the ring holds STAGES tiles)
#define CHUNK (NBYTES % 16 ? 8 : 16)    // bytes per async copy: rows of 24 bytes (d = 64, 3 bits) start on 8 only
#define TWO_CHAINS (KC == 2)            // score mma in two accumulator chains (see attend)
#define KS (D / 32)                     // k-steps of the int8 score mma (KEYS_AFFINE)
#define KQ (D / 4)                      // coordinates of a lane's key share (KEYS_AFFINE: its query share too)
#define KEY_BITS (NBYTES * 8 / D)       // KEYS_AFFINE: bits per key code, 2 or 3 (the key bytes are the values')
#define KEY_MID (((1 << KEY_BITS) - 1) * 0.5f)  // KEYS_AFFINE: the grid's level is step (c - KEY_MID)
#define MAGIC_I 0x4b400000              // 1.5 x 2^23 as float bits: an int32 sum started here reads as that float + sum
#define MAGIC_F 12582912.f
#define NEG_INF (-__int_as_float(0x7f800000))
#define HALF_NEG_INF 0xfc00u            // a missing token's key norm: its score is -inf, its weight 0

extern "C" {
extern __shared__ __align__(128) u32 pk_smem[];
}

// The shared address of pk_smem, where the table starts.
__device__ __forceinline__ u32 smem_base() {
    u32 r;
    asm("mov.u32 %0, pk_smem;" : "=r"(r));
    return r;
}

// x, as a value the compiler knows nothing of
__device__ __forceinline__ u32 opaque(u32 x) {
    asm volatile("mov.b32 %0, %0;" : "+r"(x));
    return x;
}

__device__ __forceinline__ void mma16816(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void imma16832(int c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
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

// The NC codewords whose W-bit indices ``idx`` holds (index j at bits [j W, (j + 1) W)), as NC * WORDS words of
// f16 pairs in codebook order. Codeword n of this lane's copy sits at byte ROW_BYTES n + ``lane_off`` of the
// table. With 256-byte rows the offset is the index byte laid over the lane's offset byte: one byte permute for
// 8-bit indices, a funnel shift and a LOP3 for 6-bit ones (128-byte rows: the index extracted, then shifted and
// added); then one add of the table's base. The loads are not volatile, so the compiler schedules them freely;
// they stay after the ring's wait because their addresses come from it.
template <int NC>
__device__ __forceinline__ void gather(u32 lane_off, const u32* idx, u32* out) {
#pragma unroll
    for (int j = 0; j < NC; ++j) {
        u32 off;
        if (ROW_BYTES == 128) {
            const int bit = j * W, word = bit >> 5;
            const u32 next = W == 8 || (bit & 31) + W <= 32 ? 0u : idx[word + 1];
            const u32 code = W == 8 ? __byte_perm(idx[j >> 2], 0, 0x4440 + (j & 3))
                                    : __funnelshift_r(idx[word], next, bit & 31) & (N_CODES - 1);
            off = (code << 7) + lane_off;
        } else if (W == 8) {
            off = __byte_perm(idx[j >> 2], lane_off, 0x6604 | ((j & 3) << 4));
        } else {
            const int bit = j * W, word = bit >> 5, at = bit & 31;
            const u32 v = at >= 8 ? __funnelshift_r(idx[word], at + W > 32 ? idx[word + 1] : 0u, at - 8)
                                  : idx[word] << (8 - at);
            off = (v & ((N_CODES - 1) << 8)) | lane_off;
        }
        const u32 entry = smem_base() + off;
        if (WORDS == 2) {
            asm("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(out[2 * j]), "=r"(out[2 * j + 1]) : "r"(entry));
        } else {
            asm("ld.shared.u32 %0, [%1];\n" : "=r"(out[j]) : "r"(entry));
        }
    }
}

// NB index bytes at shared address p, aligned to A bytes, as 32-bit words (little-endian): the widest loads A
// allows. Volatile: they must stay after the wait for the ring slot.
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
            for (int i = 0; i < NB / 2; i += 2) {  // pairs of halves joined by one byte permute
                u32 lo, hi;
                asm volatile("ld.shared.u16 %0, [%1];\n" : "=r"(lo) : "r"(p + 2 * i));
                if (i + 1 == NB / 2) {
                    w[i / 2] = lo;
                    break;
                }
                asm volatile("ld.shared.u16 %0, [%1];\n" : "=r"(hi) : "r"(p + 2 * i + 2));
                w[i / 2] = __byte_perm(lo, hi, 0x5410);
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

__device__ __forceinline__ u32 lds32(u32 p) {
    u32 w;
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(w) : "r"(p));
    return w;
}

// The tokens of a tile in their mma places (tile token tau = 0..15 in stored order): n-tile nt of S = Q K^T holds
// keys 8 nt .. 8 nt + 7 (lane g reads key 8 nt + g); lane t's scores are tokens 8 nt + 2t, + 1, which are also
// its rows 2t, 2t+1 | 2t+8, 2t+9 of P^T and its value tokens. In stored order the index reads of a warp fall on
// distinct banks but for a 2-way overlap of the value reads, and every lane's offsets differ by constants.
struct Tile {
    u32 kidx[2][(KEY_BYTES + 3) / 4];  // keys 8nt + g: bytes t KEY_BYTES on
    u32 vidx[4][(VAL_BYTES + 3) / 4];  // values 2t, 2t+1, 2t+8, 2t+9: bytes g VAL_BYTES on
};

// Norms of this lane's tokens as f16 pairs: k[nt], v[nt] = tokens 8nt + 2t, 8nt + 2t + 1.
struct Norms {
    u32 k[2], v[2];
};

__device__ __forceinline__ int value_token(int j, int t) { return 2 * t + (j & 1) + 8 * (j >> 1); }

// Where index byte b of tile token tok sits in its array of a ring slot: the rows of tokens 0..7 (and 8..15, 8 rows
// on) permuted by ROW_PERM (3 bits per token) and the CHUNK-byte chunks of a row XORed with CHUNK_XOR (2 bits per
// token), so that the warp's index reads spread over the banks (cuda_decode.RING_SWIZZLE). A lane's
// copies and reads each touch fixed places of a slot, so the swizzle costs no instruction in the loop.
__device__ __forceinline__ u32 slot_byte(int tok, int b) {
    if (!SWIZZLED) return tok * NBYTES + b;  // offsets the compiler can fold
    const int row = ((ROW_PERM >> (3 * (tok & 7))) & 7) | (tok & 8);
    const int chunk = (b / CHUNK) ^ ((CHUNK_XOR >> (2 * (tok & 7))) & 3);
    return row * NBYTES + chunk * CHUNK + b % CHUNK;
}

// Read this lane's words of a tile from a ring slot at ``slot``; ``lane_key``, ``lane_val`` (even and odd value
// tokens) and ``lane_norm`` are the lane's offsets into the slot.
__device__ __forceinline__ void read_slot(Tile& tile, Norms& n, u32 slot, u32 lane_key, const u32 (&lane_val)[2],
                                          u32 lane_norm, bool norms_too) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) lds_bytes<KEY_BYTES, KEY_ALIGN>(slot + lane_key + 8 * nt * NBYTES, tile.kidx[nt]);
#pragma unroll
    for (int j = 0; j < 4; ++j)
        lds_bytes<VAL_BYTES, VAL_ALIGN>(slot + ARRAY_BYTES + lane_val[j & 1] + 8 * (j >> 1) * NBYTES, tile.vidx[j]);
    if (norms_too) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            n.k[nt] = lds32(slot + 2 * ARRAY_BYTES + lane_norm + 16 * nt);
            n.v[nt] = lds32(slot + 2 * ARRAY_BYTES + 2 * TILE + lane_norm + 16 * nt);
        }
    }
}

// The same words read from global memory, for a tile whose norms could not be staged (rows not 16-byte aligned:
// then only the norms, ``index_too`` false) or the last, partial tile of a range: tokens at or past ``hi`` get
// index bytes 0 (a valid codeword), key norm -inf and value norm 0.
__device__ __forceinline__ void ld_bytes(const u8* p, int nb, bool in, u32* w) {
    for (int i = 0; i < (nb + 3) / 4; ++i) w[i] = 0;
    if (in)
        for (int i = 0; i < nb; ++i) w[i / 4] |= (u32)__ldg(p + i) << (8 * (i % 4));
}

__device__ __forceinline__ void read_global(Tile& tile, Norms& n, const u8* krow, const u8* vrow, const u16* kn,
                                            const u16* vn, int base, int hi, int g, int t, bool index_too) {
    if (index_too) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            const int tok = base + 8 * nt + g;
            ld_bytes(krow + (long long)tok * NBYTES + t * KEY_BYTES, KEY_BYTES, tok < hi, tile.kidx[nt]);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int tok = base + value_token(j, t);
            ld_bytes(vrow + (long long)tok * NBYTES + g * VAL_BYTES, VAL_BYTES, tok < hi, tile.vidx[j]);
        }
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
        u32 kw = 0, vw = 0;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int i = base + 8 * nt + 2 * t + e;
            const bool in = i < hi;
            kw |= (in ? (u32)__ldg(kn + i) : HALF_NEG_INF) << (16 * e);
            vw |= (in ? (u32)__ldg(vn + i) : 0u) << (16 * e);
        }
        n.k[nt] = kw;
        n.v[nt] = vw;
    }
}

// KEYS_AFFINE: the scores of key n-tile ``kidx`` (key 8nt + g, this lane's KQ coordinates). The keys are codes c of a
// uniform grid (level = step (c - KEY_MID), TurboQuant grid="uniform"), so the codes themselves are the int8 B operand
// of mma.m16n8k32: register m = 4w + j of a lane holds its coordinates 16w + 4i + j (i = 0..3), which is why the
// query's int8 A fragments are laid out by the same rule (see the query set-up). 2-bit codes, four to an index byte:
// the register is codes 4i + j of the lane's word w, one shift and one AND. 3-bit codes in planes
// (codecs/planes.py): the same from the KQ / 16 words of low bits, ORed with the high bits, bit m of byte i of the
// lane's next word (d = 128; at d = 64 its 16 bits are spread a nibble per byte first), shifted to bit 2.
// The query enters as two int8 parts, hi + lo / 256 (~15 bits; one part alone gives 0.6-4% output error), each
// summed in int32 from 1.5 x 2^23 so the sums read as floats exactly; S = hi + lo / 256 - cq in units of the row's
// scale (attend applies it in the exponentials), cq carrying the starts and the grid's offset KEY_MID x sum(q). No
// codebook, no shared-memory gather: of the table's traffic only the values' half is left (docs/kernels.md section 4).
__device__ __forceinline__ void keys_affine(const u32* kidx, const u32 (&qa)[KSTEPS][4], const float (&cq)[2],
                                            float* c) {
    u32 kb[2 * KS];
    u32 high = 0;
    if (KEY_BITS == 3) {
        high = kidx[KQ / 16];
        if (KQ == 16) {  // 16 bits, nibble i = byte i's high bits: spread a nibble to a byte
            high = (high | (high << 8)) & 0x00ff00ffu;
            high = (high | (high << 4)) & 0x0f0f0f0fu;
        }
    }
#pragma unroll
    for (int m = 0; m < 2 * KS; ++m) {
        kb[m] = (kidx[m >> 2] >> (2 * (m & 3))) & 0x03030303u;
        if (KEY_BITS == 3) kb[m] |= (m >= 2 ? high >> (m - 2) : high << (2 - m)) & 0x04040404u;
    }
    int hi[4] = {MAGIC_I, MAGIC_I, MAGIC_I, MAGIC_I};
    if (!ROWS2) {
        // up to 8 query rows: the lo parts ride in the A rows g + 8, which hold no query row, so one mma chain
        // sums both and each lane has hi (c0, c1) and lo (c2, c3) of the same scores
#pragma unroll
        for (int s = 0; s < KS; ++s) imma16832(hi, qa[s][0], qa[s][1], qa[s][2], qa[s][3], kb[2 * s], kb[2 * s + 1]);
#pragma unroll
        for (int e = 0; e < 2; ++e)
            c[e] = fmaf(__int_as_float(hi[2 + e]), 1.f / 256.f, __int_as_float(hi[e]) - cq[0]);
        return;
    }
    int lo[4] = {MAGIC_I, MAGIC_I, MAGIC_I, MAGIC_I};
#pragma unroll
    for (int s = 0; s < KS; ++s) {
        imma16832(hi, qa[s][0], qa[s][1], qa[s][2], qa[s][3], kb[2 * s], kb[2 * s + 1]);
        imma16832(lo, qa[KS + s][0], qa[KS + s][1], qa[KS + s][2], qa[KS + s][3], kb[2 * s], kb[2 * s + 1]);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e)
        c[e] = fmaf(__int_as_float(lo[e]), 1.f / 256.f, __int_as_float(hi[e]) - cq[e >> 1]);
}

// One tile: S = Q K^T, the online softmax, O^T += V^T P^T. FULL: every token of the tile is visible (a ring
// tile), so no key norm is the -inf mark of a missing token and the scores skip that check (measured faster).
template <bool FULL>
__device__ __forceinline__ void attend(const Tile& cur, const Norms& norms, const u32 (&qa)[KSTEPS][4],
                                       float (&acc)[VTILES][1 + ROWS2][4], float (&m_run)[2], float (&l_run)[2],
                                       u32 k_off, u32 v_off, int t, u32 spread_lo, u32 spread_hi,
                                       const float (&qscale)[2], const float (&cq)[2]) {
    // S = Q K^T over two n-tiles of 8 tokens: mma B is key 8nt + g, one codeword load per k-step;
    // c[nt] = rows g (0, 1), g + 8 (2, 3) x tokens 8nt + 2t (+ 1); at k = 2 (3 and 4 bits) even and odd k-steps in
    // two accumulators, halving the chain of dependent mma (measured faster at 3 and 4 bits); at k = 4 one chain,
    // whose 8 fewer registers and adds keep the 2-bit kernel from spilling (docs/kernels.md section 11)
    float c[2][4], c_odd[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
        if (KEYS_AFFINE) {
            keys_affine(cur.kidx[nt], qa, cq, c[nt]);
            continue;
        }
        u32 kw[KEY_CODES * WORDS];
        gather<KEY_CODES>(k_off, cur.kidx[nt], kw);
#pragma unroll
        for (int e = 0; e < 4; ++e) c[nt][e] = c_odd[nt][e] = 0.f;
#pragma unroll
        for (int s = 0; s < KSTEPS; ++s)
            mma16816(s % 2 && TWO_CHAINS ? c_odd[nt] : c[nt], qa[s][0], qa[s][1], qa[s][2], qa[s][3], kw[2 * s], kw[2 * s + 1]);
#pragma unroll
        for (int e = 0; e < 4; ++e)
            if (TWO_CHAINS) c[nt][e] += c_odd[nt][e];
    }
    // Online softmax of rows g (r = 0) and g + 8 (r = 1) over the tile. The row maxima are reduced across the
    // row's 4 lanes (two shuffles) and O^T rescaled only in a tile where some score passes its row's running max,
    // which one vote finds: after the first tiles that is rare, so most tiles skip the shuffles, the rescale
    // factor and the rescale (the same arithmetic as reducing every tile, fewer dependent steps).
    bool grew = false;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
        const float kn0 = half_to_float(norms.k[nt] & 0xffff), kn1 = half_to_float(norms.k[nt] >> 16);
#pragma unroll
        for (int r = 0; r <= ROWS2; ++r) {
            // -inf norms mark missing tokens: score -inf whatever the (finite) dot product. KEYS_AFFINE: scores and
            // the running max stay in units of the row's scale (qscale), which the exponentials apply
            if (FULL) {
                c[nt][2 * r] *= kn0;
                c[nt][2 * r + 1] *= kn1;
            } else {
                c[nt][2 * r] = kn0 == NEG_INF ? NEG_INF : c[nt][2 * r] * kn0;
                c[nt][2 * r + 1] = kn1 == NEG_INF ? NEG_INF : c[nt][2 * r + 1] * kn1;
            }
            grew |= fmaxf(c[nt][2 * r], c[nt][2 * r + 1]) > m_run[r];
        }
    }
    if (__any_sync(0xffffffff, grew)) {
        float alpha[2];
#pragma unroll
        for (int r = 0; r <= ROWS2; ++r) {
            float tile_max = fmaxf(fmaxf(c[0][2 * r], c[0][2 * r + 1]), fmaxf(c[1][2 * r], c[1][2 * r + 1]));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 2));
            const float m_new = fmaxf(m_run[r], tile_max);  // finite: the tile has a visible token
            alpha[r] = fast_exp2(KEYS_AFFINE ? (m_run[r] - m_new) * qscale[r] : m_run[r] - m_new);
            m_run[r] = m_new;
            l_run[r] *= alpha[r];
        }
        // O^T's columns are rows 2t, 2t+1 [+ 8], whose alpha lanes 8t and 8t + 4 hold
#pragma unroll
        for (int n = 0; n <= ROWS2; ++n) {
            const float a_even = __shfl_sync(0xffffffff, alpha[n], 8 * t);
            const float a_odd = __shfl_sync(0xffffffff, alpha[n], 8 * t + 4);
#pragma unroll
            for (int i = 0; i < VTILES; ++i) {
                acc[i][n][0] *= a_even;
                acc[i][n][1] *= a_odd;
                acc[i][n][2] *= a_even;
                acc[i][n][3] *= a_odd;
            }
        }
    }
    u32 pb[2][2];  // mma B of O^T = V^T P^T: k rows 8nt + 2t (+ 1) = tokens 8nt + 2t (+ 1), x row g [+ 8]
#pragma unroll
    for (int r = 0; r <= ROWS2; ++r) {
        float p_sum = 0.f;
        const float m_scaled = -m_run[r] * qscale[r];  // KEYS_AFFINE: exp2(qscale (c - m)) is one FFMA too
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            const float p0 = fast_exp2(KEYS_AFFINE ? fmaf(c[nt][2 * r], qscale[r], m_scaled) : c[nt][2 * r] - m_run[r]);
            const float p1 =
                fast_exp2(KEYS_AFFINE ? fmaf(c[nt][2 * r + 1], qscale[r], m_scaled) : c[nt][2 * r + 1] - m_run[r]);
            p_sum += p0 + p1;
            // the value norms applied in f16x2: the product enters the mma in f16 anyway
            asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(pb[r][nt]) : "r"(pack_halves(p0, p1)), "r"(norms.v[nt]));
        }
        l_run[r] += p_sum;
    }
    // values 2t, 2t+1, 2t+8, 2t+9 (gathered after the softmax: before it, the live words push the kernel past 128
    // registers and it spills)
    u32 vw[4][VAL_CODES * WORDS];
#pragma unroll
    for (int j = 0; j < 4; ++j) gather<VAL_CODES>(v_off, cur.vidx[j], vw[j]);
    if (PAIRED) {
        // At most 4 query rows fill half of O^T's 8 columns, so the other half takes a second coordinate: column
        // n < 4 is row n at coordinate c, column n + 4 row n at c', and a register of V^T's A fragment holds a
        // token's (c, c') pair as its codeword stores it (no permute), k rows 2t and 2t + 1 both that token. P^T
        // then routes each to its column: lane g < 4 puts its probability in the low half (k row 2t) and zero in
        // the high one, lane g >= 4 (query rows 4..7 copy rows 0..3) the reverse. Even tokens 2t, 2t+8 form one
        // mma, odd tokens the next: twice the mma of 32 coordinates each, the same count as the unpaired path's 16.
        const u32 even[2] = {__byte_perm(pb[0][0], 0, spread_lo), __byte_perm(pb[0][1], 0, spread_lo)};
        const u32 odd[2] = {__byte_perm(pb[0][0], 0, spread_hi), __byte_perm(pb[0][1], 0, spread_hi)};
#pragma unroll
        for (int i = 0; i < VTILES; ++i) {
            mma16816(acc[i][0], vw[0][2 * i], vw[0][2 * i + 1], vw[2][2 * i], vw[2][2 * i + 1], even[0], even[1]);
            mma16816(acc[i][0], vw[1][2 * i], vw[1][2 * i + 1], vw[3][2 * i], vw[3][2 * i + 1], odd[0], odd[1]);
        }
    } else {
        // A fragments of V^T pair two tokens per register: one byte permute per register
#pragma unroll
        for (int i = 0; i < VTILES; ++i) {
            const u32 a0 = __byte_perm(vw[0][i], vw[1][i], 0x5410);  // coord 16i + g, tokens 2t, 2t+1
            const u32 a1 = __byte_perm(vw[0][i], vw[1][i], 0x7632);  // coord 16i + g + 8
            const u32 a2 = __byte_perm(vw[2][i], vw[3][i], 0x5410);  // tokens 2t+8, 2t+9
            const u32 a3 = __byte_perm(vw[2][i], vw[3][i], 0x7632);
#pragma unroll
            for (int n = 0; n <= ROWS2; ++n) mma16816(acc[i][n], a0, a1, a2, a3, pb[n][0], pb[n][1]);
        }
    }
}

// Close this lane's group of async copies (cp.async.wait_group waits for all but the newest few groups).
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

__device__ __forceinline__ void cp_async(u32 dst, const u8* src) {
    if (CHUNK == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src) : "memory");
}

// One lane's share of filling the ring: CHUNK-byte copies from its chunks of the key and the value index bytes
// (the arrays share out the lanes: values start where the key chunks end, modulo 32) and, on the lanes after
// them, of the key and value norms. Its sources run through the warp's tiles in order, NW TILE tokens apart, so a
// fill is a few copies and three pointer increments, not a source recomputed from the tile's token.
// A lane's second chunk of an array (64 chunks at 4 bits, 48 at 3) is 32 chunks on, which the swizzle leaves 32 chunks
// on in the slot: its rows move by whole tokens (8 or 16), and the swizzle permutes rows 8..15 as 0..7.
struct Feed {
    static constexpr int chunks = ARRAY_BYTES / CHUNK, norm_chunks = 2 * TILE / CHUNK;
    const u8* k;  // this lane's first key chunk of the warp's next tile
    const u8* v;
    const u8* n;  // its norm chunk (key norms or value norms), if it has one
    u32 k_at, v_at, n_at;  // where they land in a slot
    bool has_k, has_v, has_n;  // the first chunk (a lane holds at most two of an array)

    __device__ __forceinline__ Feed(const u8* krow, const u8* vrow, const u16* knrow, const u16* vnrow, int tok,
                                    int lane, bool norms_too) {
        const int ck = lane, cv = (lane - chunks % 32) & 31, cn = (lane - (2 * chunks) % 32) & 31;
        has_k = ck < chunks;
        has_v = cv < chunks;
        has_n = norms_too && cn < 2 * norm_chunks;
        k = krow + (long long)tok * NBYTES + ck * CHUNK;
        v = vrow + (long long)tok * NBYTES + cv * CHUNK;
        n = reinterpret_cast<const u8*>((cn < norm_chunks ? knrow : vnrow) + tok) + (cn % norm_chunks) * CHUNK;
        k_at = slot_byte(ck * CHUNK / NBYTES, ck * CHUNK % NBYTES);
        v_at = ARRAY_BYTES + slot_byte(cv * CHUNK / NBYTES, cv * CHUNK % NBYTES);
        n_at = 2 * ARRAY_BYTES + cn * CHUNK;
    }

    // Start copying the warp's next TPS tiles into the slot at ``slot``, then step to the ones after them.
    __device__ __forceinline__ void fill(u32 slot) {
#pragma unroll
        for (int u = 0; u < TPS; ++u) {
            const u32 at = slot + u * SLOT_BYTES;
            const int from = u * TILE * NBYTES;
#pragma unroll
            for (int c = 0; c < (chunks + 31) / 32; ++c) {
                const int step = 32 * CHUNK * c;
                if (c == 0 ? has_k : k_at + step < ARRAY_BYTES) cp_async(at + k_at + step, k + from + step);
                if (c == 0 ? has_v : v_at + step < 2 * ARRAY_BYTES) cp_async(at + v_at + step, v + from + step);
            }
            if (has_n) cp_async(at + n_at, n + u * TILE * 2);
        }
        k += NW * TPS * TILE * NBYTES;
        v += NW * TPS * TILE * NBYTES;
        n += NW * TPS * TILE * 2;
    }
};

extern "C" __global__ void __launch_bounds__(NW * 32, ROWS2 ? 1 : 16 / NW) fibquant_mma_decode(
    const u16* __restrict__ q,       // (BH, rows, D) f16: rotated, scaled by scaling * log2(e)
    const u8* __restrict__ kidx, const u16* __restrict__ knorm,
    const u8* __restrict__ vidx, const u16* __restrict__ vnorm,
    const u32* __restrict__ kbook, const u32* __restrict__ vbook,  // (N, KC) f16 codebooks as words
    const int* __restrict__ lens,    // (BH,) visible tokens per row, or NULL
    float* __restrict__ acc_out, float* __restrict__ max_out, float* __restrict__ sum_out,
    int s_kv, int chunk, int n_kv_heads, int split_offset, int split_total, int rows,
    int kidx_sb, int kidx_sh, int knorm_sb, int knorm_sh,
    int vidx_sb, int vidx_sh, int vnorm_sb, int vnorm_sh) {
    u32* smem = pk_smem;
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

    // This warp's units of TPS full tiles (tiles TPS (warp + NW i) + u for i < n_mine) stream through its ring; the
    // tiles left over (full ones short of a unit, and the last, partial one) are read from global memory, each by the
    // warp whose turn it is.
    const int full_tiles = max(hi - lo, 0) / TILE, units = full_tiles / TPS;
    const int n_mine = units > warp ? (units - warp + NW - 1) / NW : 0;
    const bool norms_too = ((reinterpret_cast<size_t>(knrow) | reinterpret_cast<size_t>(vnrow)) & (CHUNK - 1)) == 0;
    const u32 ring = smem_base() + TABLE_BYTES + warp * STAGES * SLOT_BYTES;
    Feed feed(krow, vrow, knrow, vnrow, lo + warp * TPS * TILE, lane, norms_too);
    for (int s = 0; s < SLOTS; ++s) {
        if (s < n_mine) feed.fill(ring + s * TPS * SLOT_BYTES);
        commit();  // a group per slot, empty or not: the wait below counts groups
    }

    // the table (while the first tiles are in flight): row n holds codeword n's key copies; the value copies of a
    // different value codebook follow in the row (256-byte rows) or in a second table (128-byte rows)
    const int v_words = ROW_BYTES == 128 ? N_CODES * 32 : 32;
    for (int i = threadIdx.x; i < N_CODES * 32; i += NW * 32) {
        const int n = i / 32, w = i % 32;
        // KEYS_AFFINE reads no key codewords (kbook holds the grid's step): the row holds the value codeword
        smem[n * (ROW_BYTES / 4) + w] = __ldg((KEYS_AFFINE ? vbook : kbook) + n * WORDS + w % WORDS);
        if (!SHARED_BOOK) smem[v_words + n * (ROW_BYTES / 4) + w] = __ldg(vbook + n * WORDS + w % WORDS);
    }
    // opaque to the compiler: knowing their bits, it masks them again in every 6-bit gather (a LOP3 per codeword)
    const u32 k_off = opaque((lane % COPIES) * WORDS * 4);
    const u32 v_off = opaque(k_off + (SHARED_BOOK ? 0 : v_words * 4));

    // Query fragments, mma A of S = Q K^T (m = query rows, k = coordinates): k-step s holds codec coordinates
    // 4 (t KSTEPS + s) + 0..3 of rows g and g + 8 at fragment columns (2t, 2t+1 | 2t+8, 2t+9): four
    // consecutive halves, one 8-byte load. Rows past ``rows`` are zero; when PAIRED, rows 4..7 copy rows 0..3 (the
    // value mma needs each lane's probabilities of its row g mod 4) and rows 8..15 are zero.
    const int row_g = PAIRED ? g & 3 : g;
    u32 qa[KSTEPS][4];
    float qscale[2] = {0.f, 0.f}, cq[2] = {0.f, 0.f};
    if (KEYS_AFFINE) {
        // int8 A fragments of the int8 score mma (keys_affine): lane t reads its row's KQ coordinates KQ t .. (its
        // keys' coordinates), the row's largest |q| (4 lanes) sets the scale 127 / top, and each coordinate becomes
        // hi = round(q scale) and lo = round(256 (q scale - hi)), clamped to +-127. Step s of the mma takes the bytes
        // of m = 2 s + hh (coordinates 16 (m / 4) + 4 i + m % 4, i = 0..3) in A registers 2 hh (row g) and 2 hh + 1
        // (row g + 8: the lo parts when at most 8 rows, else that row's hi, its lo in a second chain).
        const float step = __ldg(reinterpret_cast<const float*>(kbook));
#pragma unroll
        for (int h = 0; h < 1 + ROWS2; ++h) {
            const int row = h ? g + 8 : row_g;
            const bool live = row < rows && !(h && PAIRED);
            float x[KQ];
#pragma unroll
            for (int i = 0; i < KQ; i += 8) {
                uint4 v = make_uint4(0, 0, 0, 0);
                if (live) v = *reinterpret_cast<const uint4*>(q + ((long long)bh * rows + row) * D + KQ * t + i);
                const u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                for (int e = 0; e < 8; ++e) x[i + e] = half_to_float((u16)(words[e / 2] >> (16 * (e % 2))));
            }
            float top = 0.f;
#pragma unroll
            for (int i = 0; i < KQ; ++i) top = fmaxf(top, fabsf(x[i]));
            top = fmaxf(top, __shfl_xor_sync(0xffffffff, top, 1));
            top = fmaxf(top, __shfl_xor_sync(0xffffffff, top, 2));
            const float scale = top > 0.f ? 127.f / top : 0.f;
            int sum_hi = 0, sum_lo = 0;
            u32 hi_w[KQ / 4], lo_w[KQ / 4];
#pragma unroll
            for (int i = 0; i < KQ / 4; ++i) hi_w[i] = lo_w[i] = 0;
#pragma unroll
            for (int i = 0; i < KQ; ++i) {
                // rounded by adding 1.5 x 2^23 (the integer lands in the low bits), at full rate: rintf and the
                // float-to-int conversions run at a quarter, and at short contexts this set-up is a block's
                // main cost
                const float y = x[i] * scale, ry = y + MAGIC_F, r = ry - MAGIC_F;
                const int a = __float_as_int(ry) - MAGIC_I;
                const int b = max(min(__float_as_int(fmaf(y - r, 256.f, MAGIC_F)) - MAGIC_I, 127), -127);
                sum_hi += a;
                sum_lo += b;
                // coordinate i = 16 w + 4 i' + j goes to byte i' of word 4 w + j
                const int word = 4 * (i / 16) + i % 4, byte = (i / 4) % 4;
                hi_w[word] |= (u32)(a & 0xff) << (8 * byte);
                lo_w[word] |= (u32)(b & 0xff) << (8 * byte);
            }
            sum_hi += __shfl_xor_sync(0xffffffff, sum_hi, 1);
            sum_hi += __shfl_xor_sync(0xffffffff, sum_hi, 2);
            sum_lo += __shfl_xor_sync(0xffffffff, sum_lo, 1);
            sum_lo += __shfl_xor_sync(0xffffffff, sum_lo, 2);
#pragma unroll
            for (int s2 = 0; s2 < KS; ++s2)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    if (ROWS2) {  // rows g and g + 8 are query rows: hi and lo in two mma chains
                        qa[s2][2 * hh + h] = hi_w[2 * s2 + hh];
                        qa[KS + s2][2 * hh + h] = lo_w[2 * s2 + hh];
                    } else {  // row g's hi in A row g, its lo in A row g + 8: one chain
                        qa[s2][2 * hh] = hi_w[2 * s2 + hh];
                        qa[s2][2 * hh + 1] = lo_w[2 * s2 + hh];
                    }
                }
            qscale[h] = top > 0.f ? top / 127.f * step : 1.f;  // a zero row: every score 0, any positive scale
            // both sums' start and the grid's offset, in one float: hi - cq is exact, and cq's rounding (< 0.5) is
            // an offset of the row's scores about as large as the f16 query's rounding in the other variants
            cq[h] = MAGIC_F + (MAGIC_F / 256.f + KEY_MID * ((float)sum_hi + (float)sum_lo / 256.f));
        }
    }
#pragma unroll
    for (int s = 0; s < (KEYS_AFFINE ? 0 : KSTEPS); ++s) {
        const int col = 4 * (t * KSTEPS + s);
        uint2 v0 = make_uint2(0, 0), v1 = make_uint2(0, 0);
        if (row_g < rows) v0 = *reinterpret_cast<const uint2*>(q + ((long long)bh * rows + row_g) * D + col);
        if (g + 8 < rows)  // never when PAIRED, but the compiler keeps the registers (constant zeros cost moves)
            v1 = *reinterpret_cast<const uint2*>(q + ((long long)bh * rows + g + 8) * D + col);
        qa[s][0] = v0.x; qa[s][1] = v1.x; qa[s][2] = v0.y; qa[s][3] = v1.y;
    }

    // Rows g and g + 8 (r = 0, 1): running max (base 2), the same in the 4 lanes of a row, and this lane's
    // share of the normaliser (its tokens 8nt + 2t, + 1 of every tile).
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};
    // O^T: m-tile i (coords 16i + g | + 8) x rows (8n + 2t, + 1); when PAIRED, (coords 32i + g | + 8) x (rows 2t, + 1
    // at coordinate c for t < 2, rows 2t - 4, - 3 at c' for t >= 2)
    float acc[VTILES][1 + ROWS2][4];
#pragma unroll
    for (int i = 0; i < VTILES; ++i)
#pragma unroll
        for (int n = 0; n <= ROWS2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][n][e] = 0.f;
    __syncthreads();

    // the byte permutes that put a value weight in the half of P^T's register its column takes (PAIRED)
    const u32 spread_lo = g < 4 ? 0x4410 : 0x1044, spread_hi = g < 4 ? 0x4432 : 0x3244;
    const u32 lane_key = slot_byte(g, t * KEY_BYTES), lane_norm = 4 * t;
    const u32 lane_val[2] = {slot_byte(2 * t, g * VAL_BYTES), slot_byte(2 * t + 1, g * VAL_BYTES)};
    u32 slot = ring;
    for (int i = 0; i < n_mine; ++i) {
        // this lane's copies of unit i have landed once at most the SLOTS - 1 groups after its own are pending;
        // the warp barrier then makes every lane's copies visible to all
        asm volatile("cp.async.wait_group %0;\n" ::"n"(SLOTS - 1) : "memory");
        __syncwarp();
#pragma unroll
        for (int u = 0; u < TPS; ++u) {
            Tile cur;
            Norms norms;
            read_slot(cur, norms, slot + u * SLOT_BYTES, lane_key, lane_val, lane_norm, norms_too);
            if (u == TPS - 1) {  // the slot is read: refill it (one tile's words are live, not the unit's)
                __syncwarp();
                if (i + SLOTS < n_mine) feed.fill(slot);
                commit();
                slot += TPS * SLOT_BYTES;
                if (slot == ring + STAGES * SLOT_BYTES) slot = ring;
            }
            if (!norms_too) {
                const int base = lo + ((warp + NW * i) * TPS + u) * TILE;
                read_global(cur, norms, krow, vrow, knrow, vnrow, base, hi, g, t, false);
            }
            attend<true>(cur, norms, qa, acc, m_run, l_run, k_off, v_off, t, spread_lo, spread_hi, qscale, cq);
        }
    }
    // The tiles past the ring: full ones short of a slot, then the partial one. With one-tile slots there is only the
    // partial one, and the loop stops after it, so it compiles to a single test (a loop there measured slower for
    // FibQuant at d = 128).
    const int left = units * TPS;
    for (int x = left; x * TILE < hi - lo && (TPS > 1 || x == left); ++x) {
        if (warp != x % NW) continue;
        Tile cur;
        Norms norms;
        read_global(cur, norms, krow, vrow, knrow, vnrow, lo + x * TILE, hi, g, t, true);
        attend<false>(cur, norms, qa, acc, m_run, l_run, k_off, v_off, t, spread_lo, spread_hi, qscale, cq);
    }

    // merge the NW warps of the block through shared memory (the tables and rings are dead: reuse them)
    __syncthreads();
    float* s_max = reinterpret_cast<float*>(smem);  // [NW][16]
    float* s_sum = s_max + NW * 16;                 // [NW][16]
    float* s_acc = s_sum + NW * 16;                 // [16][D], rows in codec coordinates
#pragma unroll
    for (int r = 0; r <= ROWS2; ++r) {
        float l = l_run[r] + __shfl_xor_sync(0xffffffff, l_run[r], 1);
        l += __shfl_xor_sync(0xffffffff, l, 2);
        if (t == 0) {
            s_max[warp * 16 + 8 * r + g] = KEYS_AFFINE ? m_run[r] * qscale[r] : m_run[r];  // base 2, unscaled
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
    // O^T element (m-tile i, half hh, column e) is kernel coordinate 16i + 8hh + g = codec g D/8 + 2i + hh; when
    // PAIRED, row (2t + e) mod 4 at codec coordinate g D/8 + 4i + 2hh + (t >= 2): word 2i + hh of the lane's value
    // codewords, its first half (c) or its second (c')
    for (int w = 0; w < NW; ++w) {  // one warp at a time: no atomics
        if (warp == w) {
#pragma unroll
            for (int n = 0; n <= ROWS2; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int row = PAIRED ? (2 * t + e) & 3 : 8 * n + 2 * t + e;
                    float* out = s_acc + row * D + g * (D / 8) + (PAIRED ? t >> 1 : 0);
                    const int step = PAIRED ? 4 : 2, half = PAIRED ? 2 : 1;
#pragma unroll
                    for (int i = 0; i < VTILES; ++i) {
                        out[step * i] += acc[i][n][e] * scale[n][e];
                        out[step * i + half] += acc[i][n][2 + e] * scale[n][e];
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
