// The emulator's fiber switch (declared in include/apt_cuda_emu.h), x86-64 System V: the callee-saved registers
// rbp, rbx, r12-r15 go onto the current stack, whose pointer is stored in *save_sp (rdi); then the stack at load_sp
// (rsi) is entered and its registers popped, and `ret` resumes that fiber where it last switched (or, the first
// time, at the address init_fiber put there). The caller-saved registers and the SSE state need no saving: this is
// an ordinary call as far as the compiler knows.
#if defined(__x86_64__)
asm(R"(
    .text
    .globl apt_emu_switch
    .hidden apt_emu_switch
    .type apt_emu_switch, @function
apt_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size apt_emu_switch, .-apt_emu_switch
)");
#endif
