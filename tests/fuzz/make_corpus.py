#!/usr/bin/env python3
"""Writes the reproducers of issue 27 into tests/fuzz/corpus/ (fuzz_config, fuzz_safetensors).

A fuzz_config input is decoded by FuzzedDataProvider: integers are taken from the end of the
input (the first integer consumed is the last bytes, most significant byte first), strings from
its front. This script mirrors the order in which tests/fuzz/fuzz_config.cpp consumes its fields;
check a reproducer with a build of the target made with -DTPA_FUZZ_TRACE, which prints the
config it decodes and the error it gets. Run: python3 tests/fuzz/make_corpus.py
"""
import os
import struct

INT64_MIN, INT64_MAX, INT32_MAX = -(1 << 63), (1 << 63) - 1, (1 << 31) - 1
SPECIAL = [0, -1, INT32_MAX, 1 << 31, 1 << 62, INT64_MAX, INT64_MIN]  # index_field's kSpecial
FLOAT_SPECIAL = ['0', '-0', 'inf', '-inf', 'nan', 'denorm', 'max', '-1']  # float_field's


class Input:
    def __init__(self):
        self.back = []   # bytes of integers, in the order they are consumed
        self.front = b""  # string bytes

    def byte(self, b):  # ConsumeIntegralInRange with a range below 256, or ConsumeBool
        self.back.append(b & 0xFF)

    def in_range(self, value, lo):  # range < 256: one byte, value = lo + byte % (range + 1)
        self.byte(value - lo)

    def index(self, v):  # index_field
        if v in SPECIAL:
            self.byte(1)
            self.byte(SPECIAL.index(v))
        elif -1 <= v <= 12:
            self.byte(2)
            self.in_range(v, -1)
        else:
            self.byte(0)
            self.back.extend(((v - INT64_MIN) % (1 << 64)).to_bytes(8, "big"))

    def float_(self, v):  # float_field: 'typical', 'zero' or one of FLOAT_SPECIAL
        if v == 'typical' or v == 'zero':
            self.byte(2)
            self.byte(1 if v == 'zero' else 0)
        else:
            self.byte(1)
            self.byte(FLOAT_SPECIAL.index(v))

    def rope(self, max_positions, style=1, rotary_dim=0):  # rope_field, base 10000
        self.in_range(style, -1)
        self.byte(1)
        self.index(rotary_dim)
        self.index(max_positions)

    def string(self, s):  # ConsumeRandomLengthString: s, then an escaped terminator
        self.front += s + b"\\A"

    def bytes(self):
        return self.front + bytes(reversed(self.back))


def gqa(d_model=16, n_heads=4, n_kv_heads=0, head_dim=16, max_positions=64, norm_eps='typical'):
    i = Input()
    i.in_range(1, 0)  # fuzz_gqa
    for v in (d_model, n_heads, n_kv_heads, head_dim):
        i.index(v)
    i.rope(max_positions)
    i.float_('zero')  # softmax_scale 0: 1/sqrt(head_dim)
    i.byte(0)         # head_norm
    i.float_(norm_eps)
    return i.bytes()


def tpa(d_model=16, n_heads=4, head_dim=8, q_rank=2, k_rank=2, v_rank=2, norm_eps='typical'):
    i = Input()
    i.in_range(3, 0)  # fuzz_tpa
    for v in (d_model, n_heads, head_dim, q_rank, k_rank, v_rank):
        i.index(v)
    i.byte(0)  # kv_only
    i.rope(64)
    i.float_('zero')
    i.byte(0)
    i.float_(norm_eps)
    return i.bytes()


def mla(nope=4, rope_dim=4):
    i = Input()
    i.in_range(2, 0)  # fuzz_mla
    for v in (16, 2, 8, 4, nope, rope_dim, 4):  # d_model n_heads q_lora kv_lora d_n d_R d_v
        i.index(v)
    i.rope(64)
    i.float_('zero')
    i.float_('typical')
    i.in_range(0, -1)  # form kAuto
    return i.bytes()


def cache(max_blocks, seq, layer, n=1):
    i = Input()
    i.in_range(4, 0)  # fuzz_cache
    i.in_range(1, 0)  # one layout
    i.in_range(2, 0)  # of two factors
    for name in (b"K", b"V"):
        i.string(name)
        i.index(2)  # rows
        i.index(4)  # cols
        i.byte(0)   # rotated
    i.string(b"GQA")
    i.index(4)          # block_tokens
    i.index(max_blocks)
    i.in_range(0, -1)   # append to layer 0
    i.in_range(3, -1)   # 3 tokens
    i.index(8)          # reserve_tokens 8
    i.in_range(seq, -1)
    i.in_range(layer, -1)
    i.index(n)
    return i.bytes()


def safetensors_nul():
    header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}' + b"\0\0\0"
    return struct.pack("<Q", len(header)) + header + b"\0\0\x80\x3f"


REPRODUCERS = {
    "fuzz_config": {
        "gqa_rope_max_positions_2p61": gqa(max_positions=1 << 61),
        "gqa_rope_max_positions_2p60": gqa(max_positions=1 << 60),
        "gqa_rope_max_positions_2p40": gqa(max_positions=1 << 40),
        "gqa_n_heads_minus4": gqa(n_heads=-4),
        "gqa_n_heads_2p62": gqa(n_heads=1 << 62, n_kv_heads=1),
        "gqa_n_kv_heads_minus1": gqa(n_kv_heads=-1),
        "gqa_norm_eps_inf": gqa(norm_eps='inf'),
        "tpa_norm_eps_inf": tpa(norm_eps='inf'),
        "tpa_k_rank_2p62": tpa(k_rank=1 << 62),
        "mla_nope_plus_rope_overflow": mla(nope=INT64_MAX, rope_dim=INT64_MAX),
        "cache_max_blocks_int32_max": cache(INT32_MAX, seq=0, layer=0),
        "cache_blocks_needed_unknown_seq": cache(8, seq=2, layer=0),
        "cache_blocks_needed_unknown_layer": cache(8, seq=0, layer=3),
        "cache_blocks_needed_negative_seq": cache(INT32_MAX, seq=-1, layer=-1, n=-1),
    },
    "fuzz_safetensors": {
        "header_nul_padding": safetensors_nul(),
    },
}

if __name__ == "__main__":
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
    for target, files in REPRODUCERS.items():
        os.makedirs(os.path.join(root, target), exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(root, target, name), "wb") as f:
                f.write(data)
            print(f"{target}/{name}: {len(data)} bytes")
