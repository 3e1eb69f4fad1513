export PYTHONPATH=.
s=$(date +%s)
ARBFN_AUTOTUNE=0 HYPOTHESIS_PROFILE=quick timeout 320 python -m pytest -q -p no:cacheprovider tests/arbfn/test_compiled_step.py tests/arbfn/test_graphed_step.py -rs -v > $OUT/tests.txt 2>&1; echo "rc $? $(( $(date +%s)-s )) s" >> $OUT/tests.txt
grep -E "PASS|FAIL|SKIP|rc " $OUT/tests.txt | cut -c1-150
s=$(date +%s)
timeout 220 python -m benchmarks.profile_step --device cuda --matmul-precision high --compute-dtype bfloat16 --layout stochastic --rows 40 > $OUT/profile.txt 2>&1; echo "rc $? $(( $(date +%s)-s )) s" >> $OUT/profile.txt
head -20 $OUT/profile.txt
