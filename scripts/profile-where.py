#!/usr/bin/env python3
"""Names the guest code behind sampled kvm_emulate_insn events (profile-where.sh's reader).

Input on stdin: `perf script -F trace` lines of kvm:kvm_emulate_insn, "CSBASE:RIP:BYTES (MODE)".
Each sampled address is placed in the guest kernel function that holds it (System.map); the
output lists the functions and the kinds of kernel work that account for the most samples,
as emulated instructions (divided by --per: per exec).
"""
import argparse
import bisect
import collections
import re
import sys

# Kinds of kernel work, matched in this order against a function's name.
KINDS = [
    ("timer tick, clocks", r"tick|timekeep|hrtimer|clocksource|clockevent|pvclock|ktime|vsyscall|"
     r"jiffies|timer|lapic_next|read_tsc|sched_clock|account_|rcu_sched_clock|update_process_times"),
    ("scheduler", r"sched|load_avg|decay_load|pelt|vruntime|update_curr|_entity|pick_|enqueue|"
     r"dequeue|set_next_task|put_prev|switch_to|switch_mm|finish_task_switch|resched|wake_up|"
     r"ttwu|update_rq|cfs|deadline|idle"),
    ("page init and free at boot", r"memmap_init|init_single_page|free_pages_core|free_pages_ok|"
     r"memblock|check_pages|e820|reserve_bootmem|deferred_init"),
    ("page faults, page tables, mappings", r"fault|pte|pmd|pud|p4d|pgd|folio|filemap|lru|mas_|"
     r"mtree|ma_|mmap|vma|unmap|tlb|rmap|xas_|rmqueue|free_unref|buddy|zone|mm_|anon|cow|"
     r"page"),
    ("slab and other allocation", r"slab|kmem|kmalloc|kfree|alloc|free|percpu|pcpu"),
    ("kernel entry and exit", r"entry|syscall|exit_to_user|swapgs|restore_regs|irqentry|"
     r"sysvec|asm_|iret|do_int"),
    ("code patching (alternatives, static calls)", r"text_poke|alternative|insn_|static_call|"
     r"jump_label|paravirt_patch|optimize_nops"),
    ("random numbers", r"blake2s|chacha|crng|random|entropy"),
    ("console and printk", r"serial|uart|lsr|printk|vsnprintf|format_decode|number|"
     r"string_nocheck|console"),
    ("exec, fork, exit, files", r"exec|bprm|elf|fork|copy_process|dup_|exit|wait|path|dentry|"
     r"inode|file|fd_|open|close|namei|lookup|d_|signal|pid|cred|fs_|seq_|proc_|ext4|ovl_|"
     r"erofs|shmem|cpio|unpack|initramfs|do_copy|write_buffer"),
    ("vsock, virtio, sockets", r"vsock|virtio|virtqueue|vring|sock|skb|unix|net"),
    ("command line parsing", r"param|parse_args|strlen|strcmp|strncmp|strsep|next_arg|cmdline"),
    ("locks and memory primitives", r"lock|spin|mutex|rwsem|memcpy|memset|memmove|memcmp|rep_|"
     r"str|mem"),
]


def load_map(path):
    syms = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1] in "tTwW":
                try:
                    syms.append((int(parts[0], 16), parts[2]))
                except ValueError:
                    continue
    syms.sort()
    return [a for a, _ in syms], [n for _, n in syms]


def kind_of(name):
    for kind, rx in KINDS:
        if re.search(rx, name):
            return kind
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--map", required=True)
    ap.add_argument("--per", type=float, default=1.0)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--title", default="")
    a = ap.parse_args()
    addrs, names = load_map(a.map)
    funcs = collections.Counter()
    total = user = 0
    for line in sys.stdin:
        # "0:ffffffff8104b2c3:f3 48 ab (prot64)": the second field is the guest RIP.
        parts = line.strip().split(":")
        if len(parts) < 2:
            continue
        try:
            rip = int(parts[1], 16)
        except ValueError:
            continue
        total += 1
        if rip < 0xFFFF800000000000:
            user += 1
            funcs["<guest user mode>"] += 1
            continue
        i = bisect.bisect_right(addrs, rip) - 1
        funcs[names[i] if i >= 0 else "<outside System.map>"] += 1
    scale = 1 / a.per
    print(f"{a.title}: {total * scale:,.0f} emulated instructions")
    if total == 0:
        print("  no samples: did the VM run on this host's KVM?")
        return
    kinds = collections.Counter()
    for name, n in funcs.items():
        kinds["guest user mode" if name.startswith("<") else kind_of(name)] += n
    print("  by kind of work:")
    for kind, n in kinds.most_common():
        print(f"    {100 * n / total:5.1f}%  {n * scale:>12,.0f}  {kind}")
    print(f"  top {a.top} functions:")
    for name, n in funcs.most_common(a.top):
        print(f"    {100 * n / total:5.1f}%  {n * scale:>12,.0f}  {name}")


if __name__ == "__main__":
    main()
