/* A harmless payload: prints a greeting and its pid. Built by the test suite with gcc. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
    printf("hello from pid %d\n", (int)getpid());
    return 0;
}
