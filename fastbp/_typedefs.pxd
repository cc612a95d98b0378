# Element types shared by fastbp's kernel modules (cimport this instead of declaring a fused type per module).
ctypedef fused floating:
    float
    double
