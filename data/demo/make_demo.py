"""Writes the demo data set under data/demo/. Every sentence here was written by the
fin-tasks authors for this project (no text is taken from a benchmark); the script is
kept so the demo can be regenerated or extended deterministically.

    python data/demo/make_demo.py
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from fin_tasks.tasks import EDTSUM_INSTRUCTION, FINARG_INSTRUCTION

HERE = Path(__file__).parent
PREMISES = [
    "Revenue in the quarter rose 12% to $4.1 billion, driven by higher volumes in our cloud segment.",
    "We shipped 1.8 million units, up from 1.5 million in the same quarter last year.",
    "Gross margin came in at 41.2%, which is 80 basis points above the prior year.",
    "Operating expenses declined 3% as we completed the consolidation of two data centers.",
    "Our backlog at the end of the quarter stood at $2.3 billion.",
    "Free cash flow was $310 million, compared with $250 million a year ago.",
    "We repurchased 4 million shares during the quarter for about $180 million.",
    "Same-store sales grew 5% in North America and 2% in Europe.",
    "Customer churn fell to 1.1% per month from 1.4% last year.",
    "Inventory days improved by nine days as supply constraints eased.",
    "We opened 35 new stores and closed 12 underperforming locations.",
    "Net interest margin expanded to 3.2% as deposit costs stayed flat.",
    "About 60% of new bookings came from existing customers expanding their contracts.",
    "Freight costs were roughly $40 million lower than in the second quarter.",
    "The new plant in Ohio reached full production in August.",
    "Average selling prices were up 4% year over year across the portfolio.",
    "Our subscription revenue now represents 72% of total revenue.",
    "Capital expenditures for the year were $1.1 billion, in line with guidance.",
    "We added 420,000 net new subscribers in the quarter.",
    "The euro weakened against the dollar, reducing reported sales by about 2 points.",
    "Loan loss provisions increased to $95 million from $60 million.",
    "Our top ten customers accounted for 28% of sales this year.",
    "Utilization across the fleet averaged 87% during the quarter.",
    "We refinanced $500 million of notes due 2027 at a lower coupon.",
    "Research and development spending rose to 14% of revenue.",
    "Orders from the automotive segment were down 6% sequentially.",
    "Headcount ended the quarter at 12,400, roughly flat with last year.",
    "The acquisition contributed $85 million of revenue in its first full quarter.",
    "Energy costs at our European sites doubled compared with two years ago.",
    "We collected on several large receivables that had been delayed in the spring.",
]
CLAIMS = [
    "We believe we are well positioned to gain share in the second half.",
    "I think this is the strongest pipeline we have ever had.",
    "We remain confident in our full-year outlook.",
    "Our strategy is clearly working, and we intend to stay the course.",
    "We expect margins to keep improving as volumes recover.",
    "This is a business that should grow faster than the market for years to come.",
    "Pricing discipline will remain a priority for us.",
    "We see significant opportunity in the mid-market segment.",
    "I am very pleased with how the team executed this quarter.",
    "The investments we are making today will pay off over the long term.",
    "We think the worst of the supply chain disruption is behind us.",
    "Demand in our core markets remains healthy.",
    "We are not going to chase volume at the expense of profitability.",
    "Our balance sheet gives us plenty of flexibility to pursue acquisitions.",
    "Frankly, we should have moved faster on cost reductions last year.",
    "We expect the new product line to be accretive to earnings next year.",
    "The competitive environment is rational, and we do not see that changing.",
    "I would characterize the quarter as solid but not spectacular.",
    "We are committed to returning excess cash to shareholders.",
    "We think the regulatory changes will ultimately benefit larger players like us.",
    "Our brand is a real competitive advantage in this category.",
    "We feel good about the trajectory of the international business.",
    "Longer term, we see automation as the key driver of productivity.",
    "The integration is ahead of plan and we expect synergies to exceed our targets.",
    "We do not anticipate any material impact from the tariff changes.",
    "I believe the market is underestimating the value of our services business.",
    "We intend to keep investing through the cycle.",
    "This acquisition makes us the clear leader in the segment.",
    "We expect the headwinds from currency to fade next year.",
    "Our focus on execution is what differentiates us.",
]


# Composed sentences on top of the hand-written ones, so that the demo's valid split is large
# enough for a confidence interval to tell a model that learned from the majority class.
METRICS = ["Revenue", "Operating income", "Net sales", "Gross profit", "Free cash flow",
           "Adjusted EBITDA", "Subscription revenue", "Services revenue", "Net interest income",
           "Operating cash flow", "Recurring revenue", "Segment profit"]
PERIODS = ["the quarter", "the third quarter", "the first half", "the fiscal year",
           "the fourth quarter", "the second quarter", "the twelve months to June"]
SEGMENTS = ["the cloud segment", "North America", "the industrial division", "Europe",
            "the consumer business", "the services unit", "Asia Pacific", "the wholesale channel"]
THINGS = ["units", "vehicles", "devices", "orders", "homes", "tonnes of product", "subscriptions"]
BELIEFS = ["We believe", "We expect", "We are confident", "I think", "We remain convinced",
           "Our view is", "We anticipate", "I am optimistic"]
OUTCOMES = ["demand will stay resilient", "our margins will keep improving",
            "the new platform positions us to win share", "the pricing environment will remain "
            "rational", "the integration will deliver the synergies we promised",
            "customers will keep consolidating their spending with us", "the worst of the "
            "slowdown is behind us", "our investments will pay off", "this business can grow "
            "faster than the market", "the second half will be stronger than the first"]
HORIZONS = ["over the next few years", "next year", "in the coming quarters", "over time",
            "through the cycle", "for the foreseeable future", "from here"]
STANCES = ["is a real competitive advantage for us", "remains the key driver of our growth",
           "gives us a clear edge over competitors", "is exactly the right strategy",
           "will be a priority for the whole team", "makes us the natural partner for large "
           "customers"]
SUBJECTS = ["Our brand", "Our distribution network", "The strength of our balance sheet",
            "Our focus on execution", "The quality of our engineering team", "Our installed base",
            "Pricing discipline", "Our cost structure"]


def composed_premise(rng: random.Random) -> str:
    """A factual sentence: a reported figure, a count or a comparison (mostly numeric)."""
    p, x, y = rng.randint(2, 38), rng.randint(12, 980), rng.randint(12, 980)
    up = rng.random() < 0.6
    forms = [
        f"{rng.choice(METRICS)} {'rose' if up else 'fell'} {p}% to ${x} million in "
        f"{rng.choice(PERIODS)}.",
        f"We shipped {x},{rng.randint(100, 999)} {rng.choice(THINGS)} in {rng.choice(PERIODS)}, "
        f"{'up' if up else 'down'} from {y},{rng.randint(100, 999)} a year earlier.",
        f"{rng.choice(METRICS)} was ${x} million, compared with ${y} million in "
        f"{rng.choice(PERIODS)} last year.",
        f"{rng.choice(SEGMENTS).capitalize()} accounted for {p}% of total revenue in "
        f"{rng.choice(PERIODS)}.",
        f"Headcount ended {rng.choice(PERIODS)} at {x},{rng.randint(100, 999)}, "
        f"{'up' if up else 'down'} {p}% year over year.",
        f"We {'opened' if up else 'closed'} {rng.randint(3, 60)} locations in "
        f"{rng.choice(SEGMENTS)} during {rng.choice(PERIODS)}.",
    ]
    return rng.choice(forms)


def composed_claim(rng: random.Random) -> str:
    """An opinion or expectation (rarely with a number: claims can cite targets)."""
    forms = [
        f"{rng.choice(BELIEFS)} that {rng.choice(OUTCOMES)} {rng.choice(HORIZONS)}.",
        f"{rng.choice(SUBJECTS)} {rng.choice(STANCES)}.",
        f"{rng.choice(BELIEFS)} {rng.choice(OUTCOMES)}, and we intend to keep investing "
        f"{rng.choice(HORIZONS)}.",
        f"We expect {rng.choice(METRICS).lower()} to grow about {rng.randint(3, 15)}% "
        f"{rng.choice(HORIZONS)}.",
    ]
    return rng.choice(forms)


def finarg(composed: int = 260) -> None:
    """Task 1 demo rows: the hand-written sentences and `composed` more (55% premises),
    shuffled and split 50/25/25 into train, valid and test."""
    rng = random.Random(7)
    rows = [(t, "premise") for t in PREMISES] + [(t, "claim") for t in CLAIMS]
    seen = {text for text, _ in rows}
    while len(rows) < len(PREMISES) + len(CLAIMS) + composed:
        label = "premise" if rng.random() < 0.55 else "claim"
        text = composed_premise(rng) if label == "premise" else composed_claim(rng)
        if text not in seen:
            seen.add(text)
            rows.append((text, label))
    rng.shuffle(rows)
    out = HERE / "finarg_ecc"
    out.mkdir(exist_ok=True)
    half, quarter = len(rows) // 2, len(rows) // 4
    splits = {"train.jsonl": rows[:half], "valid.jsonl": rows[half:half + quarter],
              "test.jsonl": rows[half + quarter:]}
    for offset, (name, part) in enumerate(splits.items()):
        with (out / name).open("w", encoding="utf-8") as handle:
            for number, (text, label) in enumerate(part, start=1000 * offset):
                record = {"id": f"demo_finarg{number}",
                          "query": f"{FINARG_INSTRUCTION}\nText: {text}\nAnswer:",
                          "answer": label, "text": text, "choices": ["premise", "claim"],
                          "gold": ["premise", "claim"].index(label)}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")


COMPANIES = ["Northwind Analytics", "Bluefield Energy", "Harbor Lane Bank", "Quartz Robotics",
             "Silverpine Foods", "Meridian Health Systems", "Oakridge Logistics", "Lumen Bay Software",
             "Cedar Point Insurance", "Redstone Mining", "Vantage Retail Group", "Crescent Pharma"]
CITIES = ["CHICAGO", "AUSTIN", "BOSTON", "DENVER", "SEATTLE", "ATLANTA"]
EVENTS = [
    ("reports third-quarter results; revenue rises {p}% to ${m} million",
     "{c} today reported results for its third quarter. Revenue increased {p}% to ${m} million, "
     "compared with the same period last year, as demand from enterprise customers remained strong. "
     "Net income was ${n} million. The company raised its full-year revenue outlook and said it "
     "expects continued growth in its subscription business. \"Our teams delivered another quarter "
     "of disciplined execution,\" said the chief executive officer."),
    ("to acquire a regional competitor for ${m} million in cash",
     "{c} announced today that it has signed a definitive agreement to acquire a regional competitor "
     "for ${m} million in cash. The transaction is expected to close in the first quarter, subject to "
     "regulatory approvals, and to add to earnings within twelve months. The combined company will "
     "serve more than {k} customers. Management said the deal expands its footprint and brings "
     "complementary products to its platform."),
    ("declares quarterly dividend of ${d} per share",
     "The board of directors of {c} has declared a quarterly cash dividend of ${d} per share, payable "
     "next month to shareholders of record at the close of business on the record date. The company "
     "has paid a dividend for {y} consecutive years. The board also reaffirmed its share repurchase "
     "program, under which ${m} million remains available."),
    ("appoints new chief financial officer",
     "{c} announced the appointment of a new chief financial officer, effective next month. The "
     "incoming executive brings {y} years of experience in finance roles at public companies, most "
     "recently as treasurer of a large industrial group. The current finance chief will remain with "
     "the company as an adviser during the transition. The company reiterated its financial guidance."),
    ("prices ${m} million offering of senior notes",
     "{c} today announced the pricing of ${m} million aggregate principal amount of senior notes due "
     "in {y} years. The notes will bear interest at {p}% per year. The company intends to use the net "
     "proceeds to repay outstanding borrowings under its credit facility and for general corporate "
     "purposes. The offering is expected to settle later this week."),
    ("opens new distribution center, adding {k} jobs",
     "{c} has opened a new distribution center that will add about {k} jobs over the next two years. "
     "The facility covers {m} thousand square feet and uses automated sorting systems. The company said "
     "the site will shorten delivery times for customers in the region and lower shipping costs. "
     "Local officials welcomed the investment."),
]


def edtsum() -> None:
    rng = random.Random(11)
    rows = []
    for number in range(30):
        company = COMPANIES[number % len(COMPANIES)]
        headline, body = EVENTS[number % len(EVENTS)]
        values = {"c": company, "p": rng.randint(3, 25), "m": rng.randint(40, 900),
                  "n": rng.randint(5, 90), "k": rng.randint(200, 5000),
                  "d": f"{rng.randint(5, 95) / 100:.2f}", "y": rng.randint(5, 30)}
        city = CITIES[number % len(CITIES)]
        article = f"{city}, /PRNewswire/ -- " + body.format(**values)
        rows.append({"id": f"demo_edtsum{number}",
                     "query": f"{EDTSUM_INSTRUCTION}\nText: {article}\nAnswer:",
                     "answer": f"{company} " + headline.format(**values), "text": article})
    out = HERE / "edtsum"
    out.mkdir(exist_ok=True)
    for name, part in (("train.jsonl", rows[:24]), ("test.jsonl", rows[24:])):
        with (out / name).open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)


CONCEPTS = [
    ("下列哪一项属于流动资产？", ["应收账款", "固定资产", "无形资产", "长期股权投资"], "A"),
    ("企业在资产负债表日对存货进行计量时，应采用的原则是____。", ["历史成本", "成本与可变现净值孰低", "公允价值", "重置成本"], "B"),
    ("中央银行最常用的货币政策工具中，不包括____。", ["公开市场操作", "再贴现", "存款准备金率", "财政补贴"], "D"),
    ("下列关于系统性风险的说法，正确的是____。", ["可以通过分散投资消除", "只影响个别公司", "无法通过分散投资消除", "与市场无关"], "C"),
    ("会计核算的基本前提不包括____。", ["会计主体", "持续经营", "会计分期", "谨慎性"], "D"),
    ("以下哪一项是衡量企业短期偿债能力的指标？", ["流动比率", "资产周转率", "净资产收益率", "市盈率"], "A"),
    ("债券价格与市场利率之间的关系通常是____。", ["同向变动", "反向变动", "没有关系", "完全相等"], "B"),
    ("审计报告中，注册会计师对财务报表发表意见的类型不包括____。", ["无保留意见", "保留意见", "否定意见", "建议意见"], "D"),
    ("下列属于直接融资方式的是____。", ["银行贷款", "发行股票", "信托贷款", "融资租赁"], "B"),
    ("通货膨胀对债权人的影响通常是____。", ["有利", "不利", "没有影响", "无法判断"], "B"),
    ("企业的所有者权益不包括____。", ["实收资本", "资本公积", "应付账款", "未分配利润"], "C"),
    ("期货交易中，保证金制度的主要作用是____。", ["增加交易成本", "控制违约风险", "提高价格", "减少成交量"], "B"),
    ("下列哪项属于财政政策工具？", ["税收", "再贴现率", "公开市场操作", "存款准备金率"], "A"),
    ("资本资产定价模型中，β系数衡量的是____。", ["非系统性风险", "系统性风险", "信用风险", "流动性风险"], "B"),
]


def numeric_question(rng: random.Random, number: int) -> tuple[str, list[str], str]:
    kind = number % 4
    if kind == 0:
        price, qty = rng.randint(10, 90), rng.randint(100, 900)
        answer = price * qty
        question = f"某公司购入商品{qty}件，单价{price}元，不考虑税费，该批商品的总成本为____元。"
    elif kind == 1:
        principal, rate = rng.randint(10, 90) * 1000, rng.choice([2, 3, 4, 5, 6])
        answer = principal * rate // 100
        question = f"本金{principal}元，年利率{rate}%，按单利计算一年的利息为____元。"
    elif kind == 2:
        assets, liabilities = rng.randint(500, 900), rng.randint(100, 400)
        answer = assets - liabilities
        question = f"某企业资产总额{assets}万元，负债总额{liabilities}万元，其所有者权益为____万元。"
    else:
        cost, years = rng.randint(20, 90) * 1000, rng.choice([4, 5, 8, 10])
        answer = cost // years
        question = f"一台设备原值{cost}元，预计使用{years}年，无残值，按直线法每年折旧额为____元。"
    options = [answer, answer * 10, answer + rng.randint(1, 9) * 10, max(1, answer // 2)]
    order = rng.sample(range(4), 4)
    shuffled = [str(options[i]) for i in order]
    return question, shuffled, "ABCD"[order.index(0)]


def fineval() -> None:
    rng = random.Random(5)
    questions = list(CONCEPTS) + [numeric_question(rng, n) for n in range(22)]
    rng.shuffle(questions)
    subjects = {"demo_accounting": questions[:18], "demo_finance": questions[18:]}
    for split, slicer in (("dev", slice(0, None, 3)), ("val", None)):
        folder = HERE / "fineval" / split
        folder.mkdir(parents=True, exist_ok=True)
        for subject, items in subjects.items():
            chosen = items[slicer] if slicer else [q for i, q in enumerate(items) if i % 3]
            with (folder / f"{subject}_{split}.csv").open("w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["id", "question", "A", "B", "C", "D", "answer"])
                for number, (question, options, answer) in enumerate(chosen):
                    writer.writerow([number, question, *options, answer])


SENTIMENT = [
    ("Quarterly profit doubled as the company cut costs and raised prices .", "positive"),
    ("The lender reported record deposits and a sharp rise in fee income .", "positive"),
    ("Shares jumped after the group won a five-year contract with the city .", "positive"),
    ("Operating margin improved to 14 % from 9 % a year earlier .", "positive"),
    ("The retailer raised its full-year forecast for the second time .", "positive"),
    ("Net sales grew by 18 % , beating analyst expectations .", "positive"),
    ("The airline said bookings for the summer are well ahead of last year .", "positive"),
    ("The company returned to profit after three years of losses .", "positive"),
    ("Orders rose strongly in Asia , lifting the order backlog to a new high .", "positive"),
    ("The board proposed a higher dividend of EUR 0.60 per share .", "positive"),
    ("The miner swung to a loss as metal prices fell .", "negative"),
    ("Sales dropped 22 % and the company warned of further job cuts .", "negative"),
    ("The bank set aside more money for bad loans as defaults increased .", "negative"),
    ("Operating profit fell short of expectations due to weak demand .", "negative"),
    ("The group lowered its outlook , citing higher raw material costs .", "negative"),
    ("Shares slid after the regulator opened an investigation into the firm .", "negative"),
    ("The factory will close next year , affecting about 300 employees .", "negative"),
    ("Pre-tax profit decreased to EUR 4.1 mn from EUR 7.9 mn .", "negative"),
    ("The company operates 45 stores in Finland and Sweden .", "neutral"),
    ("The contract covers the delivery of two cranes to the port .", "neutral"),
    ("The annual general meeting will be held on 15 April .", "neutral"),
    ("The firm is headquartered in Helsinki and employs 1,200 people .", "neutral"),
    ("The new chief executive will start on 1 June .", "neutral"),
    ("The unit makes packaging materials for the food industry .", "neutral"),
    ("The company will publish its interim report in August .", "neutral"),
    ("The plant produces paper for magazines and catalogues .", "neutral"),
    ("The deal was announced in a stock exchange release on Monday .", "neutral"),
    ("The group has subsidiaries in 12 countries .", "neutral"),
    ("The shares are listed on the main market of the exchange .", "neutral"),
    ("The software is used by logistics companies to plan routes .", "neutral"),
    ("The value of the order was not disclosed .", "neutral"),
    ("The company sells its products mainly to industrial customers .", "neutral"),
    ("Revenue for the full year rose to EUR 310 mn , the highest in its history .", "positive"),
    ("The brewer lost market share in its home country for the fourth year .", "negative"),
    ("The new line increases the mill 's capacity by 30 % .", "positive"),
    ("Staff will be temporarily laid off for up to 90 days .", "negative"),
]


def sentiment() -> None:
    out = HERE / "sentiment"
    out.mkdir(exist_ok=True)
    rows = [{"ID": number + 1, "sentence": text, "label": label}
            for number, (text, label) in enumerate(SENTIMENT)]
    (out / "sentences.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")


if __name__ == "__main__":
    finarg()
    edtsum()
    fineval()
    sentiment()
