"""Runtime choices that make the same networks run faster: dtype and device policy, memory layout,
float32 compute for bfloat16 models on CPUs without bfloat16 arithmetic, and opt-in ``torch.compile``
(:mod:`diffusekit.runtime.policy`); and the timing helpers of ``diffusekit bench``
(:mod:`diffusekit.runtime.timing`)."""
