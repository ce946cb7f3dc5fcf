/*
 * A CPU that reports AVX2 and FMA only, at the host's own speed: loaded with LD_PRELOAD (tests/avx2.sh builds
 * and loads it), it turns on the kernel's CPUID faulting for the process (arch_prctl ARCH_SET_CPUID; Linux
 * 4.12+, on CPUs and VMs whose /proc/cpuinfo lists `cpuid_fault`), so every CPUID instruction traps into the
 * SIGSEGV handler below. The handler runs the real CPUID, clears what an AVX2-only CPU lacks (AVX-512 in every
 * form, VNNI and AVX-VNNI, AVX512-BF16, AVX512-FP16, AMX) and resumes after the instruction. torch, oneDNN,
 * fbgemm, ONNX Runtime's MLAS, OpenBLAS and numpy ask CPUID when they load, so they take the kernels an AVX2-only
 * CPU gets, at native speed. The setting is kept by threads and forked children; a child that runs exec gets
 * LD_PRELOAD from its environment and turns it on again.
 *
 * What it is not: the host's core stays the host's core (its caches, clocks and how wide it runs 256-bit
 * instructions), and the C library picked its string routines from the real CPUID before this file loads.
 *
 * A program's own SIGSEGV handler (Python's faulthandler, which pytest turns on) is kept behind this one:
 * faults that are not a CPUID go to it, or kill the process as before.
 *
 *   cc -O2 -shared -fPIC -o avx2_cpuid.so tests/avx2_cpuid.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_SET_CPUID 0x1012

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static struct sigaction chained; /* the program's own SIGSEGV handler, if it sets one */
static int active;

static long cpuid_allowed(int allowed) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, allowed); }

static sigaction_fn real_sigaction(void) {
    static sigaction_fn real;
    if (!real) real = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    return real;
}

/* r: eax, ebx, ecx, edx of CPUID leaf `leaf`, subleaf `sub` */
static void hide(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL */
        r[1] &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31));
        /* ECX: AVX512_VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ */
        r[2] &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: AVX512_4VNNIW, 4FMAPS, VP2INTERSECT, AMX_BF16, AVX512_FP16, AMX_TILE, AMX_INT8 */
        r[3] &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX_VNNI, AVX512_BF16, AMX_FP16, AVX_IFMA */
        r[0] &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));
        /* EDX: AVX_VNNI_INT8, AVX_NE_CONVERT, AVX_VNNI_INT16, AVX10 */
        r[3] &= ~((1u << 4) | (1u << 5) | (1u << 10) | (1u << 19));
    } else if (leaf == 0x1d || leaf == 0x1e || leaf == 0x24) {
        /* AMX tile and AVX10 leaves */
        r[0] = r[1] = r[2] = r[3] = 0;
    }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    greg_t *reg = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)reg[REG_RIP];
    if (active && info->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) {
        uint32_t r[4], leaf = (uint32_t)reg[REG_RAX], sub = (uint32_t)reg[REG_RCX];
        cpuid_allowed(1);
        __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
        cpuid_allowed(0);
        hide(leaf, sub, r);
        reg[REG_RAX] = r[0];
        reg[REG_RBX] = r[1];
        reg[REG_RCX] = r[2];
        reg[REG_RDX] = r[3];
        reg[REG_RIP] += 2;
        return;
    }
    if (chained.sa_flags & SA_SIGINFO) {
        if (chained.sa_sigaction) {
            chained.sa_sigaction(sig, info, context);
            return;
        }
    } else if (chained.sa_handler != SIG_DFL && chained.sa_handler != SIG_IGN) {
        chained.sa_handler(sig);
        return;
    }
    /* no handler of the program's: die of the fault, as without this file */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    real_sigaction()(SIGSEGV, &dfl, NULL);
    raise(SIGSEGV);
}

/* the program's SIGSEGV handler goes behind ours, not in its place */
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (sig != SIGSEGV || !active) return real_sigaction()(sig, act, old);
    if (old) *old = chained;
    if (act) chained = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    sigemptyset(&act.sa_mask);
    act.sa_flags = SA_RESTART;
    if (sigaction(sig, &act, &old) != 0) return SIG_ERR;
    return old.sa_handler;
}

__attribute__((constructor)) static void start(void) {
    if (cpuid_allowed(0) != 0) {
        fprintf(stderr, "avx2_cpuid: this kernel or CPU has no CPUID faulting: the CPU is reported as it is\n");
        return;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    real_sigaction()(SIGSEGV, &sa, NULL);
    active = 1;
}
