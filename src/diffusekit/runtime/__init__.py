"""How the same networks run faster on this machine: the device/dtype/layout plan applied once by the caller
(:mod:`diffusekit.runtime.policy`) and faster 3x3 convolutions for the CPU (:mod:`diffusekit.runtime.fastconv`)."""
