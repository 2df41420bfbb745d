/* Holds one idle VM (in-kernel IRQ chip, one vCPU that never runs) for as long as it lives.
 * Used by the hardware tier inside a QEMU TCG guest: without a VM that stays, KVM flips static
 * keys on every VM create and destroy, re-patching kernel text, and QEMU's multi-threaded TCG
 * can keep executing a stale translation of a patch site (the outer kernel then hangs). */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(void) {
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) { perror("kvmpin: /dev/kvm"); return 1; }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0 || ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0 || ioctl(vm, KVM_CREATE_VCPU, 0) < 0) {
        perror("kvmpin: holding a VM");
        return 1;
    }
    for (;;) pause();
}
