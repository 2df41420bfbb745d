//! The native-mode probe: a test guest that finds out whether this host's PVM "native" mode
//! (guest ring 0 run by the CPU instead of KVM's emulator) holds up, and at what cost. It is a
//! spike for a PVM-aware guest kernel (issue 23, `images/kernel/pvm/NATIVE.md`), not part of
//! how vmrun runs guests: only `vmrun test-guest pvm-native[:FLAGS[:OPTIONS]]` starts it.
//!
//! The guest starts in (emulated) ring 0, sets up page tables (everything user-accessible, a
//! PTI-style user table beside them, aliases in several PML4 slots), Linux's GDT layout, a
//! TSS, an IDT and the syscall MSRs, reads the PVM identification MSRs (a #GP there means "no
//! PVM": it says so and stops), times a ring-0 loop, then enters native mode by writing the
//! VIF page's address (and FLAGS) into MSR 0x4b564d10 and probes, in order: ring-0 speed, a
//! trapped privileged instruction, the hypercall (`int 0x1b`), the paravirtual and the plain
//! CPUID, exceptions through the guest IDT and back, a page fault's CR2, a LAPIC timer
//! interrupt masked and unmasked through the VIF page, the halt hypercall, which PML4 slots
//! the kernel can use, GS and `swapgs`, and a trip to guest user mode and back, where user
//! code times syscalls, reads through every slot, faults, and runs a privileged instruction.
//! OPTIONS ([`opts`]) choose the ways back (instructions or hypercalls) and leave parts out.
//! Each result is a `PVMN key=0x…` line on the serial console, printed as soon as it is known,
//! so a host that kills a livelocked probe still sees how far it got.
//!
//! The program is assembled by the Rust toolchain (`global_asm!`) into a read-only data
//! section of this binary and copied into guest memory at run time, so it must stay
//! position-independent: its own labels only through RIP-relative `lea` and relative
//! jumps, fixed guest addresses only as numbers.

use std::collections::BTreeMap;

/// Iterations of each timed section: ring-0 loops (emulated, native), trapped `rdmsr`s,
/// hypercalls, `ud2` round trips, user syscalls.
pub const EMULATED_LOOP: u64 = 20_000;
pub const NATIVE_LOOP: u64 = 100_000_000;
pub const EMULATED_RDMSR: u64 = 200;
pub const NATIVE_RDMSR: u64 = 2_000;
pub const HYPERCALLS: u64 = 10_000;
pub const EXCEPTIONS: u64 = 2_000;
pub const EMULATED_EXCEPTIONS: u64 = 50;
pub const SYSCALLS: u64 = 10_000;
/// The value user mode tries to read from kernel memory.
pub const SECRET: u64 = 0x5ec2_e75e_c2e7;
/// What a user-mode read leaves in its register when it faulted instead.
pub const FAULTED: u64 = 0xdead;
/// What a read left out leaves.
pub const SKIPPED: u64 = 0x5c1b;
/// Guest physical (and virtual, identity-mapped) addresses of the probe's kernel PGD (its
/// user PGD is the next page, as with Linux's PTI), the VIF page and the data page.
pub const PML4: u64 = 0x40_0000;
/// The kernel stack's top, also TSS.RSP0.
pub const KSTACK: u64 = 0x3f_0000;
pub const VIF: u64 = 0x40_8000;
pub const DATA: u64 = 0x40_9000;
const SECRET_OFF: u64 = 0xa0;

/// Where the secret is seen through PML4 slot `slot`: the low GiB is mapped again at PDPT
/// slot 510 of that slot (slot 511's is -2 GiB, where Linux keeps its text). The program
/// computes the same addresses itself; this is for the host side.
pub const fn alias(slot: u64) -> u64 {
    let va = (slot << 39) | (510 << 30) | (DATA + SECRET_OFF);
    // Canonical: bit 47 copied upwards.
    if slot >= 256 {
        va | 0xffff_0000_0000_0000
    } else {
        va
    }
}

std::arch::global_asm!(
    r#"
    .pushsection .rodata.vmrun_pvm_native, "a"
    # Option 1024's CR3 switch: `bts` to the user table (CR3 + 4 KiB), `btr` to the kernel's.
    # Keeps every register (rax through the data page: the syscall entry has no stack).
    .macro PTI_CR3 op
    mov qword ptr [{D_SCRATCH}], rax
    mov rax, cr3
    \op rax, 12
    mov cr3, rax
    mov rax, qword ptr [{D_SCRATCH}]
    .endm

    .balign 16
    .globl vmrun_pvm_native_start
vmrun_pvm_native_start:
    cld
    mov rsp, {KSTACK}
    call pn_say
    .asciz "start"

    # Page tables: 0..1 GiB in 2 MiB pages with the user bit (native mode runs guest ring 0 at
    # the CPU's ring 3, so every page it touches must be user-accessible), and the same
    # physical range again at -2 GiB (PML4 slot 511, PDPT slot 510).
    mov rdi, {PD}
    xor ecx, ecx
2:  mov rax, rcx
    shl rax, 21
    or rax, 0x87
    mov qword ptr [rdi + 8*rcx], rax
    inc ecx
    cmp ecx, 512
    jb 2b
    mov rax, {PD} + 7
    mov qword ptr [{PDPT}], rax
    mov qword ptr [{PDPT_HI} + 8*510], rax
    mov rax, {PDPT} + 7
    mov qword ptr [{PML4}], rax
    mov qword ptr [{UPML4}], rax
    mov rax, {PDPT_HI} + 7
    mov qword ptr [{PML4} + 8*256], rax
    mov qword ptr [{PML4} + 8*271], rax
    mov qword ptr [{PML4} + 8*272], rax
    mov qword ptr [{PML4} + 8*273], rax
    mov qword ptr [{PML4} + 8*510], rax
    mov qword ptr [{PML4} + 8*511], rax
    # The user PGD (CR3 + 4 KiB, the PTI layout) has slot 0 and an alias in slot 1 only.
    mov qword ptr [{UPML4} + 8*1], rax
    # Option 512: and, in slot 511, only the 2 MiB page holding the kernel stack (what PTI's
    # user table keeps of the kernel: the entry stack).
    test dword ptr [rip + pn_opts], 512
    jz 2f
    mov rax, 0x200000 + 0x87
    mov qword ptr [{PD_U_HI} + 8*1], rax
    mov rax, {PD_U_HI} + 7
    mov qword ptr [{PDPT_U_HI} + 8*510], rax
    mov rax, {PDPT_U_HI} + 7
    mov qword ptr [{UPML4} + 8*511], rax
2:
    mov rax, {PML4}
    mov cr3, rax

    # GDT in Linux's layout (the host's own: native mode runs the guest on the host's GDT,
    # so its selectors are what the CPU loads): kernel code 0x10, kernel data 0x18, user32
    # code 0x23, user data 0x2b, user code 0x33, TSS at 0x40.
    mov rax, 0x00cf9b000000ffff
    mov qword ptr [{GDT} + 0x08], rax
    mov rax, 0x00af9b000000ffff
    mov qword ptr [{GDT} + 0x10], rax
    mov rax, 0x00cf93000000ffff
    mov qword ptr [{GDT} + 0x18], rax
    mov rax, 0x00cffb000000ffff
    mov qword ptr [{GDT} + 0x20], rax
    mov rax, 0x00cff3000000ffff
    mov qword ptr [{GDT} + 0x28], rax
    mov rax, 0x00affb000000ffff
    mov qword ptr [{GDT} + 0x30], rax
    mov rax, {TSS_DESC}
    mov qword ptr [{GDT} + 0x40], rax
    mov word ptr [{D_DTR}], 0x4f
    mov qword ptr [{D_DTR} + 2], {GDT}
    lgdt [{D_DTR}]
    # To the new kernel selectors: CS by a far return, then the data segments.
    push 0x10
    lea rax, [rip + 2f]
    push rax
    retfq
2:  mov ax, 0x18
    mov ss, ax
    mov ds, ax
    mov es, ax
    mov rax, {KSTACK}
    test byte ptr [rip + pn_opts], 8
    jz 2f
    # Option 8: the kernel stack through the slot-511 alias.
    mov rax, {KSTACK_HI}
2:  mov qword ptr [{TSS} + 4], rax
    mov word ptr [{TSS} + 102], 104
    mov ax, 0x40
    ltr ax

    # IDT: every vector to its own 16-byte stub.
    lea rbx, [rip + pn_stubs]
    mov rdi, {IDT}
    xor ecx, ecx
3:  mov rax, rcx
    shl rax, 4
    add rax, rbx
    mov rdx, rax
    and edx, 0xffff
    or rdx, 0x100000
    mov rsi, 0x8e0000000000
    or rdx, rsi
    mov rsi, rax
    shr rsi, 16
    and esi, 0xffff
    shl rsi, 48
    or rdx, rsi
    mov qword ptr [rdi], rdx
    shr rax, 32
    mov qword ptr [rdi + 8], rax
    add rdi, 16
    inc ecx
    cmp ecx, 256
    jb 3b
    mov word ptr [{D_DTR}], 0xfff
    mov qword ptr [{D_DTR} + 2], {IDT}
    lidt [{D_DTR}]

    # syscall/sysret: EFER.SCE, STAR (kernel CS 0x10, user base 0x23 as Linux), LSTAR,
    # SFMASK.
    mov ecx, 0xc0000080
    rdmsr
    or eax, 1
    wrmsr
    mov ecx, 0xc0000081
    xor eax, eax
    mov edx, 0x00230010
    wrmsr
    lea rax, [rip + pn_syscall]
    mov rdx, rax
    shr rdx, 32
    mov ecx, 0xc0000082
    wrmsr
    mov ecx, 0xc0000084
    mov eax, 0x47700
    xor edx, edx
    wrmsr
    mov rax, {SECRET}
    mov qword ptr [{D_SECRET}], rax
    call pn_say
    .asciz "setup"

    # Identification. A #GP here (no such MSR) resumes at pn_absent.
    lea rax, [rip + pn_absent]
    mov qword ptr [{D_FIXUP}], rax
    mov ecx, 0x4b564d11
    rdmsr
    mov qword ptr [{D_FIXUP}], 0
    shl rdx, 32
    or rax, rdx
    call pn_kv
    .asciz "id"
    cmp rax, 0x4d5650
    jne pn_absent
    mov ecx, 0x4b564d12
    rdmsr
    shl rdx, 32
    or rax, rdx
    call pn_kv
    .asciz "msr12"
    mov ecx, 0x4b564d13
    rdmsr
    shl rdx, 32
    or rax, rdx
    call pn_kv
    .asciz "tsc_khz"
    mov ecx, 0x4b564d10
    rdmsr
    shl rdx, 32
    or rax, rdx
    call pn_kv
    .asciz "ctl_before"

    # Emulated ring 0: a loop, trapped rdmsrs, ud2 round trips through the IDT.
    call pn_tsc_start
    mov ecx, {EMULATED_LOOP}
4:  dec ecx
    jnz 4b
    call pn_tsc_end
    call pn_kv
    .asciz "emulated_loop_cycles"
    call pn_tsc_start
    mov ebx, {EMULATED_RDMSR}
5:  mov ecx, 0x4b564d11
    rdmsr
    dec ebx
    jnz 5b
    call pn_tsc_end
    call pn_kv
    .asciz "emulated_rdmsr_cycles"
    mov qword ptr [{D_UDSKIP}], 1
    call pn_tsc_start
    mov ebx, {EMULATED_EXCEPTIONS}
6:  ud2
    dec ebx
    jnz 6b
    call pn_tsc_end
    call pn_kv
    .asciz "emulated_ud_cycles"
    mov rax, qword ptr [{D_UD}]
    call pn_kv
    .asciz "emulated_ud_count"
    mov qword ptr [{D_UD}], 0

    # Native mode: the VIF page's address (and the flag bits the host passed) into the
    # control MSR. Everything after the wrmsr runs natively if the mode holds.
    mov rax, qword ptr [rip + pn_opts]
    call pn_kv
    .asciz "opts"
    mov rax, {VIF}
    or rax, qword ptr [rip + pn_flags]
    call pn_kv
    .asciz "ctl_write"
    mov rbx, rax
    mov rdx, rax
    shr rdx, 32
    mov ecx, 0x4b564d10
    # A host without the mode may refuse the write (#GP) or drop it.
    lea rsi, [rip + pn_no_native]
    mov qword ptr [{D_FIXUP}], rsi
    wrmsr
    mov qword ptr [{D_FIXUP}], 0
    call pn_say
    .asciz "native"
    mov ecx, 0x4b564d10
    rdmsr
    shl rdx, 32
    or rax, rdx
    call pn_kv
    .asciz "ctl_after"
    mov rcx, 0x7f
    and rcx, rbx
    cmp rcx, 0x1f
    ja 2f
    cmp rax, rbx
    jne pn_no_native
2:

    # Ring-0 speed.
    call pn_tsc_start
    mov ecx, {NATIVE_LOOP}
7:  dec ecx
    jnz 7b
    call pn_tsc_end
    call pn_kv
    .asciz "native_loop_cycles"

    # A privileged instruction (trapped, emulated, resumed).
    call pn_tsc_start
    mov ebx, {NATIVE_RDMSR}
8:  mov ecx, 0x4b564d11
    rdmsr
    dec ebx
    jnz 8b
    call pn_tsc_end
    call pn_kv
    .asciz "native_rdmsr_cycles"

    # Hypercalls: FLUSH_TLB (0x1007) as a round trip, then a number the host does not know.
    call pn_tsc_start
    mov ebx, {HYPERCALLS}
9:  mov eax, 0x1007
    int 0x1b
    dec ebx
    jnz 9b
    call pn_tsc_end
    call pn_kv
    .asciz "hypercall_cycles"
    mov eax, 0x1007
    int 0x1b
    call pn_kv
    .asciz "hypercall_flush_ret"
    mov eax, 0x1fff
    int 0x1b
    call pn_kv
    .asciz "hypercall_unknown_ret"

    # The paravirtual CPUID: the hypervisor leaf's signature, and leaf 1's ECX.
    mov eax, 0x40000000
    xor ecx, ecx
    int 0x1a
    call pn_kv
    .asciz "pvcpuid_40000000_eax"
    mov rax, rbx
    call pn_kv
    .asciz "pvcpuid_40000000_ebx"
    mov eax, 1
    xor ecx, ecx
    int 0x1a
    mov eax, ecx
    call pn_kv
    .asciz "pvcpuid_1_ecx"
    # The plain instruction, for comparison: who answers it in native mode?
    mov eax, 0x40000000
    xor ecx, ecx
    cpuid
    mov eax, ebx
    call pn_kv
    .asciz "cpuid_40000000_ebx"
    mov eax, 1
    xor ecx, ecx
    cpuid
    mov eax, ecx
    call pn_kv
    .asciz "cpuid_1_ecx"

    # An exception through the guest IDT and back (ud2: the handler skips it, iretq).
    call pn_tsc_start
    mov r12d, {EXCEPTIONS}
2:  ud2
    dec r12d
    jnz 2b
    call pn_tsc_end
    call pn_kv
    .asciz "ud_cycles"
    mov rax, qword ptr [{D_UD}]
    call pn_kv
    .asciz "ud_count"
    mov qword ptr [{D_UDSKIP}], 0

    # A page fault on an unmapped address: vector, error code, CR2 as the VIF page and as
    # `mov cr2` show it.
    lea rax, [rip + 3f]
    mov qword ptr [{D_FIXUP}], rax
    mov rax, {UNMAPPED}
    mov rax, qword ptr [rax]
3:  call pn_fault_report
    call pn_kv
    .asciz "pf_vector"

    # The LAPIC timer (x2APIC, periodic, vector 0x40, 1 ms), masked through the VIF page.
    mov byte ptr [{VIF}], 0
    mov ecx, 0x1b
    rdmsr
    or eax, 0xc00
    wrmsr
    xor edx, edx
    mov ecx, 0x80f
    mov eax, 0x1ff
    wrmsr
    mov ecx, 0x83e
    mov eax, 0xb
    wrmsr
    mov ecx, 0x832
    mov eax, 0x20040
    wrmsr
    mov ecx, 0x838
    mov eax, 1000000
    wrmsr
    call pn_spin
    mov rax, qword ptr [{D_TIMER}]
    call pn_kv
    .asciz "timer_masked_count"
    movzx eax, byte ptr [{VIF} + 1]
    call pn_kv
    .asciz "vif_pending_masked"
    # Unmasked: how long until the first interrupt, then how many in one spin.
    call pn_tsc_start
    mov byte ptr [{VIF}], 1
    test byte ptr [rip + pn_opts], 64
    jz 3f
    # Option 64: what an irq-enable does when the host flagged one pending: a hypercall
    # (FLUSH_TLB, harmless) so the host sees the unmask at once.
    cmp byte ptr [{VIF} + 1], 0
    je 3f
    mov eax, 0x1007
    int 0x1b
3:  mov ebx, 0x7fffffff
4:  cmp qword ptr [{D_TIMER}], 0
    jne 5f
    dec ebx
    jnz 4b
5:  call pn_tsc_end
    call pn_kv
    .asciz "timer_first_cycles"
    mov rbx, qword ptr [{D_TIMER}]
    call pn_spin
    mov rax, qword ptr [{D_TIMER}]
    sub rax, rbx
    call pn_kv
    .asciz "timer_unmasked_count"
    mov rax, qword ptr [{D_T_IF}]
    call pn_kv
    .asciz "timer_handler_vif"
    mov rax, qword ptr [{D_T_FL}]
    call pn_kv
    .asciz "timer_frame_rflags"
    # The halt hypercall sleeps until the next tick (taken just after one, so none is
    # pending).
    mov rbx, qword ptr [{D_TIMER}]
2:  cmp qword ptr [{D_TIMER}], rbx
    je 2b
    mov rbx, qword ptr [{D_TIMER}]
    call pn_tsc_start
    mov eax, 0x1009
    int 0x1b
    call pn_tsc_end
    call pn_kv
    .asciz "halt_cycles"
    mov rax, qword ptr [{D_TIMER}]
    sub rax, rbx
    call pn_kv
    .asciz "halt_ticks"
    # Masked again: no more ticks arrive.
    mov byte ptr [{VIF}], 0
    mov rbx, qword ptr [{D_TIMER}]
    call pn_spin
    mov rax, qword ptr [{D_TIMER}]
    sub rax, rbx
    call pn_kv
    .asciz "timer_remasked_count"
    xor edx, edx
    mov ecx, 0x838
    xor eax, eax
    wrmsr
    mov ecx, 0x832
    mov eax, 0x10040
    wrmsr

    # Supervisor reads of the secret through each alias.
    mov qword ptr [{D_U_ADDR}], {D_SECRET}
    .set pn_i, 1
    .irp slot, 1, 256, 271, 272, 273, 510, 511
    # `alias(slot)`: canonical, so bits 48-63 copy bit 47 in the upper half.
    .if \slot >= 256
    mov rax, 0xffff000000000000 | (\slot << 39) | (510 << 30) | {D_SECRET}
    .else
    mov rax, (\slot << 39) | (510 << 30) | {D_SECRET}
    .endif
    mov qword ptr [{D_U_ADDR} + 8*pn_i], rax
    .set pn_i, pn_i + 1
    .endr
    # The last: slot 511 again, on a page the kernel only ever touches through slot 0.
    mov rax, {SECRET}
    mov qword ptr [{COLD}], rax
    mov rax, {COLD_511}
    mov qword ptr [{D_U_ADDR} + 8*pn_i], rax
    mov rdi, {D_K_RES}
    mov r14d, 0x100
    call pn_read_all
    .set pn_i, 0
    .irp slot, 0, 1, 256, 271, 272, 273, 510, 511, 511_cold
    mov rax, qword ptr [{D_K_RES} + 8*pn_i]
    call pn_kv
    .asciz "kernel_read_slot\slot"
    mov rax, qword ptr [{D_K_RES} + 72 + 8*pn_i]
    call pn_kv
    .asciz "kernel_read_slot\slot\()_vector"
    .set pn_i, pn_i + 1
    .endr

    # GS: GS_BASE "KG", KERNEL_GS_BASE "UG" (trapped wrmsrs), as rdgsbase sees them, and
    # what swapgs does and costs.
    xor edx, edx
    mov ecx, 0xc0000101
    mov eax, 0x4b47
    wrmsr
    mov ecx, 0xc0000102
    mov eax, 0x5547
    wrmsr
    rdgsbase rax
    call pn_kv
    .asciz "kernel_gs"
    swapgs
    rdgsbase rax
    call pn_kv
    .asciz "kernel_gs_after_swapgs"
    swapgs
    call pn_tsc_start
    mov ebx, {NATIVE_RDMSR}
2:  swapgs
    dec ebx
    jnz 2b
    call pn_tsc_end
    call pn_kv
    .asciz "swapgs_cycles"

    # Guest user mode: sysret to pn_user, which comes back by syscall.
    mov qword ptr [{D_KSAVE}], rsp
    lea rcx, [rip + pn_user]
    mov r11d, 0x2
    .byte 0x48, 0x0f, 0x07
pn_after_user:
    mov rsp, qword ptr [{D_KSAVE}]
    call pn_say
    .asciz "back"
    mov rax, qword ptr [{D_U_CS}]
    call pn_kv
    .asciz "user_cs"
    mov rax, qword ptr [{D_U_GS}]
    call pn_kv
    .asciz "user_gs"
    mov rax, qword ptr [{D_U_GS2}]
    call pn_kv
    .asciz "user_gs_after_syscalls"
    mov rax, qword ptr [{D_S_GS}]
    call pn_kv
    .asciz "syscall_entry_gs"
    mov rax, qword ptr [{D_S_CR3}]
    call pn_kv
    .asciz "syscall_entry_cr3"
    rdgsbase rax
    call pn_kv
    .asciz "kernel_gs_back"
    mov rax, qword ptr [{D_U_CYC}]
    call pn_kv
    .asciz "syscall_cycles"
    mov rax, qword ptr [{D_SYSCALLS}]
    call pn_kv
    .asciz "syscall_count"
    .set pn_i, 0
    .irp slot, 0, 1, 256, 271, 272, 273, 510, 511, 511_cold
    mov rax, qword ptr [{D_U_RES} + 8*pn_i]
    call pn_kv
    .asciz "user_read_slot\slot"
    mov rax, qword ptr [{D_U_RES} + 72 + 8*pn_i]
    call pn_kv
    .asciz "user_read_slot\slot\()_vector"
    .set pn_i, pn_i + 1
    .endr
    mov rax, qword ptr [{D_HCRET}]
    call pn_kv
    .asciz "last_hypercall_ret"
    .set pn_i, 0
    .irp r, rax, rbx, rcx, rdx, rsi, rdi, r11, rsp
    mov rax, qword ptr [{D_REGS} + 8*pn_i]
    call pn_kv
    .asciz "user_after_fault_\r"
    .set pn_i, pn_i + 1
    .endr
    mov rax, qword ptr [{D_U_PRIV}]
    call pn_kv
    .asciz "user_priv_ran"
    mov rax, qword ptr [{D_U_CR3}]
    call pn_kv
    .asciz "user_priv_cr3"
    call pn_fault_report
    call pn_kv
    .asciz "user_priv_vector"
    call pn_say
    .asciz "done"
    mov dx, {STATUS_PORT}
    mov ax, 0
    out dx, ax
    .byte 0xeb, 0xfe

pn_no_native:
    call pn_say
    .asciz "no_native"
    mov dx, {STATUS_PORT}
    mov ax, 0
    out dx, ax
    .byte 0xeb, 0xfe

pn_absent:
    call pn_say
    .asciz "absent"
    mov dx, {STATUS_PORT}
    mov ax, 0
    out dx, ax
    .byte 0xeb, 0xfe

    # Guest user mode (CPL 3): syscalls, reads of kernel memory, a privileged instruction.
    # Results go back in registers through the last syscall (rax = 1).
pn_user:
    mov rsp, {USTACK}
    mov ax, cs
    movzx r8d, ax
    # GS base as user mode finds it (the kernel set GS_BASE "KG", KERNEL_GS_BASE "UG").
    rdgsbase rax
    mov qword ptr [{D_U_GS}], rax
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r15, rax
    mov r12d, {SYSCALLS}
2:  xor eax, eax
    syscall
    dec r12d
    jnz 2b
    rdtsc
    shl rdx, 32
    or rax, rdx
    sub rax, r15
    mov qword ptr [{D_U_CYC}], rax
    rdgsbase rax
    mov qword ptr [{D_U_GS2}], rax
    # Option 128: no fault in user mode (only reads through slots 0 and 1, which the user
    # page table of flag bit 0 maps too).
    test byte ptr [rip + pn_opts], 128
    jz 7f
    mov rdi, {D_U_RES}
    mov r14d, 0x1fc
    call pn_read_all
    mov r10d, 0x5c1b
    jmp 5f
    # Which registers survive a return from an exception: known values, a ud2 whose fixup
    # stores them.
7:  lea rsi, [rip + 6f]
    mov qword ptr [{D_FIXUP}], rsi
    mov eax, 0xa0
    mov ebx, 0xb0
    mov ecx, 0xc0
    mov edx, 0xd0
    mov esi, 0xe0
    mov edi, 0xf0
    mov r11d, 0x11
    ud2
6:  mov qword ptr [{D_REGS}], rax
    mov qword ptr [{D_REGS} + 8], rbx
    mov qword ptr [{D_REGS} + 16], rcx
    mov qword ptr [{D_REGS} + 24], rdx
    mov qword ptr [{D_REGS} + 32], rsi
    mov qword ptr [{D_REGS} + 40], rdi
    mov qword ptr [{D_REGS} + 48], r11
    mov qword ptr [{D_REGS} + 56], rsp

    # The same reads from user mode (the addresses are in the data page).
    mov rdi, {D_U_RES}
    xor r14d, r14d
    call pn_read_all
    lea rax, [rip + 5f]
    mov qword ptr [{D_FIXUP}], rax
    xor r10d, r10d
    mov rax, 0x5c1b
    mov rax, cr3
    mov r10d, 1
    mov qword ptr [{D_U_CR3}], rax
5:  mov eax, 1
    syscall
    .byte 0xeb, 0xfe

    # syscall entry: count and sysret, or (rax = 1) take user mode's results and go back.
pn_syscall:
    # Option 1024 (PTI's entry): switch to the kernel table first.
    test dword ptr [rip + pn_opts], 1024
    jz 6f
    PTI_CR3 btr
6:  cmp rax, 1
    je 2f
    # GS base as the syscall entry finds it, the first time.
    cmp qword ptr [{D_SYSCALLS}], 0
    jne 5f
    rdgsbase rbx
    mov qword ptr [{D_S_GS}], rbx
    mov rbx, cr3
    mov qword ptr [{D_S_CR3}], rbx
5:  inc qword ptr [{D_SYSCALLS}]
    # Option 1024: back on the user table before returning by sysretq or SYSRET
    # (IRET_FRAME is called from the kernel table).
    test dword ptr [rip + pn_opts], 1024
    jz 7f
    test byte ptr [rip + pn_opts], 32
    jnz 7f
    PTI_CR3 bts
7:  test byte ptr [rip + pn_opts], 32
    jz 4f
    # Option 32: the IRET_FRAME hypercall with a frame built from rcx/r11 (this entry has
    # no stack of its own, so the frame lives in the data page).
    mov qword ptr [{D_SFRAME}], rax
    mov qword ptr [{D_SFRAME} + 8], rbx
    mov qword ptr [{D_SFRAME} + 16], rdi
    mov qword ptr [{D_SFRAME} + 24], rcx
    mov qword ptr [{D_SFRAME} + 32], 0x33
    mov qword ptr [{D_SFRAME} + 40], r11
    mov qword ptr [{D_SFRAME} + 48], rsp
    mov qword ptr [{D_SFRAME} + 56], 0x2b
    mov ebx, {D_SFRAME}
    mov eax, 0x100d
    int 0x1b
    mov qword ptr [{D_HCRET}], rax
4:  test byte ptr [rip + pn_opts], 1
    jz 3f
    # Option 1: the SYSRET hypercall (arguments as KVM's: rbx, rcx, rdx; here rip, rflags,
    # rsp).
    mov rbx, rcx
    mov rcx, r11
    mov rdx, rsp
    mov eax, 0x100b
    int 0x1b
    mov qword ptr [{D_HCRET}], rax
3:  .byte 0x48, 0x0f, 0x07
2:    mov qword ptr [{D_U_CS}], r8
    mov qword ptr [{D_U_PRIV}], r10
    jmp pn_after_user

    # Every vector lands here with (error code or 0, vector) pushed by its stub.
pn_isr:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    # Option 1024 (PTI's entry): from user mode, switch to the kernel table first.
    test dword ptr [rip + pn_opts], 1024
    jz 7f
    test byte ptr [rsp + 96], 3
    jz 7f
    PTI_CR3 btr
7:  mov rax, qword ptr [rsp + 72]
    cmp rax, 0x40
    je 4f
    cmp rax, 6
    jne 2f
    cmp qword ptr [{D_UDSKIP}], 0
    je 2f
    inc qword ptr [{D_UD}]
    add qword ptr [rsp + 88], 2
    jmp 5f
2:  mov rcx, qword ptr [{D_FIXUP}]
    test rcx, rcx
    jz 3f
    mov qword ptr [{D_FIXUP}], 0
    mov qword ptr [{D_F_VEC}], rax
    mov rdx, qword ptr [rsp + 80]
    mov qword ptr [{D_F_ERR}], rdx
    mov rdx, qword ptr [rsp + 88]
    mov qword ptr [{D_F_RIP}], rdx
    mov rdx, qword ptr [rsp + 96]
    mov qword ptr [{D_F_CS}], rdx
    # Where the frame was pushed: the stack top before it (TSS.RSP0 for one from user mode).
    lea rdx, [rsp + 128]
    mov qword ptr [{D_F_TOP}], rdx
    mov rdx, qword ptr [{VIF} + 8]
    mov qword ptr [{D_F_CR2VIF}], rdx
    mov rdx, cr2
    mov qword ptr [{D_F_CR2}], rdx
    mov qword ptr [rsp + 88], rcx
    jmp 5f
3:  call pn_kv
    .asciz "unexpected_vector"
    mov rax, qword ptr [rsp + 80]
    call pn_kv
    .asciz "unexpected_error"
    mov rax, qword ptr [rsp + 88]
    call pn_kv
    .asciz "unexpected_rip"
    mov rax, qword ptr [rsp + 96]
    call pn_kv
    .asciz "unexpected_cs"
    mov dx, {STATUS_PORT}
    mov ax, 0x0300
    out dx, ax
    .byte 0xeb, 0xfe
4:  inc qword ptr [{D_TIMER}]
    movzx edx, byte ptr [{VIF}]
    mov qword ptr [{D_T_IF}], rdx
    mov rdx, qword ptr [rsp + 104]
    mov qword ptr [{D_T_FL}], rdx
    mov ecx, 0x80b
    xor eax, eax
    xor edx, edx
    wrmsr
5:  pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    add rsp, 16
    test byte ptr [rsp + 8], 3
    jz 6f
    # Option 1024: back on the user table before returning to user mode by iretq
    # (IRET_FRAME is called from the kernel table).
    test dword ptr [rip + pn_opts], 1024
    jz 8f
    test byte ptr [rip + pn_opts], 2
    jnz 8f
    PTI_CR3 bts
8:  test byte ptr [rip + pn_opts], 2
    jz 6f
    # Option 2: back to user mode by the IRET_FRAME hypercall: rbx points at rax, rbx, rdi
    # (restored from there) and then the iret frame.
    sub rsp, 24
    mov qword ptr [rsp], rax
    mov qword ptr [rsp + 8], rbx
    mov qword ptr [rsp + 16], rdi
    mov rbx, rsp
    mov eax, 0x100d
    int 0x1b
    mov qword ptr [{D_HCRET}], rax
6:  iretq

    # Prints the last recorded fault (vector, error, rip, cs, both CR2s); rax = its vector.
pn_fault_report:
    mov rax, qword ptr [{D_F_ERR}]
    call pn_kv
    .asciz "fault_error"
    mov rax, qword ptr [{D_F_RIP}]
    call pn_kv
    .asciz "fault_rip"
    mov rax, qword ptr [{D_F_CS}]
    call pn_kv
    .asciz "fault_cs"
    mov rax, qword ptr [{D_F_TOP}]
    call pn_kv
    .asciz "fault_stack_top"
    mov rax, qword ptr [{D_F_CR2VIF}]
    call pn_kv
    .asciz "fault_cr2_vif"
    mov rax, qword ptr [{D_F_CR2}]
    call pn_kv
    .asciz "fault_cr2"
    mov rax, qword ptr [{D_F_VEC}]
    ret

    # Reads the secret through the 9 addresses at D_U_ADDR, except those whose bit is set in
    # r14: the value, FAULTED or SKIPPED at [rdi + 8*i], the fault's vector or 0 at
    # [rdi + 72 + 8*i]. In either mode.
pn_read_all:
    xor ebx, ebx
2:  mov qword ptr [{D_F_VEC}], 0
    mov rdx, {SKIPPED}
    bt r14d, ebx
    jc 3f
    lea rax, [rip + 3f]
    mov qword ptr [{D_FIXUP}], rax
    mov rdx, {FAULTED}
    mov rax, qword ptr [{D_U_ADDR} + 8*rbx]
    mov rdx, qword ptr [rax]
3:  mov qword ptr [{D_FIXUP}], 0
    mov qword ptr [rdi + 8*rbx], rdx
    mov rax, qword ptr [{D_F_VEC}]
    mov qword ptr [rdi + 72 + 8*rbx], rax
    inc ebx
    cmp ebx, 9
    jb 2b
    ret

    # A fixed spin of about 30 ms natively (the timer probes' window).
pn_spin:
    mov ecx, {NATIVE_LOOP}
2:  dec ecx
    jnz 2b
    ret

    # r15 = TSC now; (later) rax = TSC - r15. Clobber rdx.
pn_tsc_start:
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r15, rax
    ret
pn_tsc_end:
    rdtsc
    shl rdx, 32
    or rax, rdx
    sub rax, r15
    ret

    # For pn_say and pn_kv, right after their `push rsi`: prints `PVMN ` and the word their
    # caller placed after its call, and moves their return address past the word.
pn_head:
    mov rsi, qword ptr [rsp + 16]
    push rsi
    lea rsi, [rip + pn_prefix]
    call pn_puts
    pop rsi
    call pn_puts
    mov qword ptr [rsp + 16], rsi
    ret

    # `call pn_say` then a NUL-terminated word: prints `PVMN word`.
pn_say:
    push rsi
    call pn_head
    push rax
    push rdx
    mov dx, {SERIAL}
    mov al, 10
    out dx, al
    pop rdx
    pop rax
    pop rsi
    ret

    # `call pn_kv` then a NUL-terminated key: prints `PVMN key=0x<rax>`. Keeps every register.
pn_kv:
    push rsi
    call pn_head
    push rax
    push rcx
    push rdx
    push rbx
    mov rbx, rax
    mov dx, {SERIAL}
    mov al, 0x3d
    out dx, al
    mov al, 0x30
    out dx, al
    mov al, 0x78
    out dx, al
    mov ecx, 16
2:  rol rbx, 4
    mov al, bl
    and al, 0xf
    cmp al, 10
    jb 3f
    add al, 0x27
3:  add al, 0x30
    out dx, al
    dec ecx
    jnz 2b
    mov al, 10
    out dx, al
    pop rbx
    pop rdx
    pop rcx
    pop rax
    pop rsi
    ret

    # Prints the NUL-terminated string at rsi; leaves rsi just past its NUL.
pn_puts:
    push rax
    push rdx
    mov dx, {SERIAL}
2:  lodsb
    test al, al
    jz 3f
    out dx, al
    jmp 2b
3:  pop rdx
    pop rax
    ret

pn_prefix:
    .asciz "PVMN "

    # One 16-byte stub per vector: (error code or 0, vector) on the stack, then pn_isr.
    .balign 16
pn_stubs:
    .set pn_v, 0
    .rept 256
    .balign 16
    .if (pn_v == 8) || ((pn_v >= 10) && (pn_v <= 14)) || (pn_v == 17) || (pn_v == 21) || (pn_v == 29) || (pn_v == 30)
    .else
    push 0
    .endif
    push pn_v
    jmp pn_isr
    .set pn_v, pn_v + 1
    .endr

    # Flag bits for the control MSR and probe options, patched in by the host (see
    # `program`).
    .balign 8
pn_flags:
    .quad 0
pn_opts:
    .quad 0
    .globl vmrun_pvm_native_end
vmrun_pvm_native_end:
    .popsection
"#,
    KSTACK = const KSTACK,
    USTACK = const 0x3e_0000u64,
    PML4 = const PML4,
    UPML4 = const PML4 + 0x1000,
    PDPT = const 0x40_2000u64,
    PD = const 0x40_3000u64,
    PDPT_HI = const 0x40_4000u64,
    IDT = const 0x40_5000u64,
    GDT = const 0x40_6000u64,
    TSS = const 0x40_7000u64,
    // Limit 0x67, base 0x40_7000, type 0x89 (available 64-bit TSS), present.
    TSS_DESC = const 0x0000_8940_7000_0067u64,
    VIF = const VIF,
    D_UD = const DATA,
    D_UDSKIP = const DATA + 0x08,
    D_FIXUP = const DATA + 0x10,
    D_F_VEC = const DATA + 0x18,
    D_F_ERR = const DATA + 0x20,
    D_F_RIP = const DATA + 0x28,
    D_F_CS = const DATA + 0x30,
    D_F_CR2VIF = const DATA + 0x38,
    D_F_CR2 = const DATA + 0x40,
    D_TIMER = const DATA + 0x48,
    D_T_IF = const DATA + 0x50,
    D_T_FL = const DATA + 0x58,
    D_SYSCALLS = const DATA + 0x60,
    D_KSAVE = const DATA + 0x68,
    D_U_CYC = const DATA + 0x70,
    D_HCRET = const DATA + 0x78,
    D_U_CS = const DATA + 0x88,
    D_U_PRIV = const DATA + 0x98,
    D_SECRET = const DATA + SECRET_OFF,
    D_DTR = const DATA + 0xb0,
    D_U_ADDR = const DATA + 0x100,
    D_U_RES = const DATA + 0x180,
    D_K_RES = const DATA + 0x400,
    D_REGS = const DATA + 0x280,
    D_SFRAME = const DATA + 0x300,
    D_U_GS = const DATA + 0x340,
    D_S_GS = const DATA + 0x348,
    D_U_GS2 = const DATA + 0x350,
    D_U_CR3 = const DATA + 0x358,
    D_F_TOP = const DATA + 0x360,
    PDPT_U_HI = const 0x40_b000u64,
    D_SCRATCH = const DATA + 0x368,
    D_S_CR3 = const DATA + 0x370,
    PD_U_HI = const 0x40_c000u64,
    COLD = const DATA + 0x1000,
    COLD_511 = const alias(511) - SECRET_OFF + 0x1000,
    KSTACK_HI = const 0xffff_ffff_803f_0000u64,
    SECRET = const SECRET,
    FAULTED = const FAULTED,
    SKIPPED = const SKIPPED,
    UNMAPPED = const 0x4000_0000u64,
    EMULATED_LOOP = const EMULATED_LOOP,
    NATIVE_LOOP = const NATIVE_LOOP,
    EMULATED_RDMSR = const EMULATED_RDMSR,
    NATIVE_RDMSR = const NATIVE_RDMSR,
    HYPERCALLS = const HYPERCALLS,
    EXCEPTIONS = const EXCEPTIONS,
    EMULATED_EXCEPTIONS = const EMULATED_EXCEPTIONS,
    SYSCALLS = const SYSCALLS,
    SERIAL = const crate::arch::x86_64::layout::SERIAL_PORT,
    STATUS_PORT = const crate::arch::x86_64::layout::STATUS_PORT,
);

// SAFETY: both names are labels the global_asm! above defines in one read-only section;
// declared as single bytes, they are only ever used for their addresses.
unsafe extern "C" {
    static vmrun_pvm_native_start: u8;
    static vmrun_pvm_native_end: u8;
}

/// Probe options (bits of the program's `pn_opts`): which way the guest returns.
pub mod opts {
    /// From a syscall to user mode by the (legacy) SYSRET hypercall (0x100b: rbx = rip,
    /// rcx = rflags, rdx = rsp) instead of `sysretq`.
    pub const HC_SYSRET: u16 = 1;
    /// From an exception to user mode by the IRET_FRAME hypercall (0x100d: rbx points at
    /// saved rax, rbx, rdi and then an iret frame) instead of `iretq`.
    pub const HC_IRET_FRAME: u16 = 2;
    /// The TSS's ring-0 stack through the -2 GiB alias (PML4 slot 511) instead of slot 0.
    pub const HIGH_STACK: u16 = 8;
    /// From a syscall to user mode by the IRET_FRAME hypercall.
    pub const SYSCALL_IRET_FRAME: u16 = 32;
    /// On unmasking with an interrupt pending, a hypercall so the host delivers it at once.
    pub const KICK_ON_UNMASK: u16 = 64;
    /// No fault in user mode: it reads only through slots 0 and 1 and skips the fault probes.
    pub const NO_USER_FAULTS: u16 = 128;
    /// The user page table of control bit 0 also maps, at -2 GiB, the 2 MiB page that holds
    /// the kernel stack (PTI's entry stack), and nothing else of the kernel half.
    pub const USER_PGD_ENTRY_STACK: u16 = 512;
    /// PTI's entry: exception and syscall entries from user mode switch CR3 to the kernel
    /// table (bit 12 clear) first, and back to the user table before returning.
    pub const PTI_CR3_SWITCH: u16 = 1024;
}

/// The probe program's bytes, with `flags` (bits 0–6 of the control MSR) and `options`
/// ([`opts`]) patched in.
pub fn program(flags: u8, options: u16) -> Vec<u8> {
    // SAFETY: both symbols are labels of the one read-only section the global_asm! above
    // defines, start before end, so the range between them is that section's initialized,
    // immutable bytes; only their addresses are taken and the range is copied out.
    let mut code = unsafe {
        let start = &raw const vmrun_pvm_native_start;
        let end = &raw const vmrun_pvm_native_end;
        let len = end.offset_from(start);
        std::slice::from_raw_parts(start, usize::try_from(len).unwrap_or(0)).to_vec()
    };
    // The last 16 bytes are `pn_flags` and `pn_opts`.
    if let Some(n) = code.len().checked_sub(16) {
        code[n] = flags & 0x7f;
        code[n + 8..n + 10].copy_from_slice(&options.to_le_bytes());
    }
    code
}

/// The `PVMN` lines of a probe's console output: bare words (stages reached) and `key=value`
/// (the last of each key, and the first).
#[derive(Debug, Default)]
pub struct Report {
    pub stages: Vec<String>,
    pub values: BTreeMap<String, u64>,
    pub firsts: BTreeMap<String, u64>,
}

impl Report {
    pub fn parse(console: &str) -> Report {
        let mut r = Report::default();
        for line in console.lines() {
            let Some(rest) = line.trim_end_matches('\r').strip_prefix("PVMN ") else {
                continue;
            };
            match rest.split_once('=') {
                Some((k, v)) => {
                    if let Some(n) = v
                        .strip_prefix("0x")
                        .and_then(|h| u64::from_str_radix(h, 16).ok())
                    {
                        r.values.insert(k.to_string(), n);
                        r.firsts.entry(k.to_string()).or_insert(n);
                    }
                }
                None => r.stages.push(rest.to_string()),
            }
        }
        r
    }

    pub fn get(&self, key: &str) -> Option<u64> {
        self.values.get(key).copied()
    }

    /// Nanoseconds per iteration of a timed section: `cycles` over `iterations` at the TSC
    /// frequency the host reported.
    pub fn ns_per(&self, cycles_key: &str, iterations: u64) -> Option<f64> {
        let khz = self.get("tsc_khz").filter(|k| *k > 0)?;
        let cycles = self.get(cycles_key)?;
        Some(cycles as f64 * 1e6 / khz as f64 / iterations.max(1) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_is_one_blob_with_its_flags_slot_last() {
        let p = program(0, 0);
        assert!(p.len() > 4096 && p.len() < 16384, "{} bytes", p.len());
        assert_eq!(&p[p.len() - 16..], &[0; 16]);
        let f = program(0xff, 3);
        assert_eq!(f[f.len() - 16], 0x7f);
        assert_eq!(f[f.len() - 8], 3);
        // `cld` first.
        assert_eq!(p[0], 0xfc);
        assert_eq!(alias(511), 0xffff_ffff_8000_0000 + DATA + SECRET_OFF);
        assert_eq!(alias(1), (1 << 39) + (510 << 30) + DATA + SECRET_OFF);
    }

    #[test]
    fn report_lines_are_parsed() {
        let r = Report::parse(
            "noise\nPVMN start\r\nPVMN tsc_khz=0x00000000000f4240\nPVMN x=zz\nPVMN c=0x3e8\n",
        );
        assert_eq!(r.stages, ["start"]);
        assert_eq!(r.get("tsc_khz"), Some(1_000_000));
        assert_eq!(r.get("x"), None);
        // 1000 cycles at 1 GHz over 10 iterations.
        assert_eq!(r.ns_per("c", 10), Some(100.0));
        let r = Report::parse("PVMN a=0x1\nPVMN a=0x2\n");
        assert_eq!((r.get("a"), r.firsts.get("a")), (Some(2), Some(&1)));
        assert_eq!(r.ns_per("a", 1), None, "no TSC frequency");
    }
}
